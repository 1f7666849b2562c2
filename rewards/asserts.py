"""Assertion tests (HumanEval's ``check``, LeetCode's ``test_code``, MBPP-style asserts) split into
cases the scorer judges itself: ``build_plan(test, entry_point, prefix, oracle) -> Plan``.

Why: a test that runs in the program's process can be made to "pass" by the program (it can walk
back to the harness's frames, patch builtins, exit early...). So each assert of a known shape is
split. Its *actual* side (the one that runs the program) stays in the test code the sandbox runs,
as ``__or1_case__(i, lambda: <actual>)``, which only reports the value. Its *expected* side never
reaches that sandbox: the scorer evaluates it (``ast.literal_eval``, else the *oracle*: a separate
sandboxed run of the reference's prefix and test setup, without the program) and ``judge``
compares the two as plain data.

Shapes converted (statements directly in ``check``'s body, or at module level when there is no
entry point; an assert's message is ignored):

- ``assert A == E`` (either order), ``A != E``                  → eq, ne
- ``assert A is None`` (``True``, ``False``; ``is not``)        → is, is_not
- ``assert abs(A - E) < T`` (``<=``; ``E - A``; ``math.fabs``; ``T > abs(..)``) → close
- ``assert math.isclose(A, E[, rel_tol=R, abs_tol=T])``        → isclose
- ``assert is_same_list(A, E)``, ``is_same_tree(A, E)`` (LeetCode's helpers) → eq, the nodes
  compared as their values (``rewards/results.py``)
- ``assert candidate(...)``, ``assert not candidate(...)``     → truth, falsy
- ``assert <a true literal>`` (``assert True, "..."``)          → dropped

E, T and R are *trusted*: with an entry point they may use no name that ``check`` binds, not its
parameter, and no module-level name of the test bound otherwise than by an import, def, class or
literal assignment (those, with the prefix, are what the oracle runs); without an entry point they
must be literals. A must not be trusted and must hold no comparison, boolean operator,
conditional, lambda or walrus: those could carry the expected value into the sandbox, where the
program could read it and report it.

The rest (asserts of other shapes, asserts inside loops, asserts whose E the oracle cannot
evaluate, e.g. because it calls a function only the program defines) stays in the test code as
written and runs the old way: whether it passed is the sandbox's word, which the program can
forge. We keep it rather than refuse such tests, because refusing would lose HumanEval-style
property tests (random inputs in a loop) entirely; the item passes only if every converted case
matches *and* the sandbox reports that the test ran through, and ``Plan.unverified`` counts the
statements of the rest that check something (an assert, a raise, or a bare call), so a verdict
that leans on them is visible (``score_code`` puts the count in its detail). A test that checks
nothing at all is refused (`BadReference`).
"""

from __future__ import annotations

import ast
import builtins
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from rewards.results import Opaque

CASE_FN = "__or1_case__"
SAME_VALUE_HELPERS = frozenset({"is_same_list", "is_same_tree"})
UNSAFE_IN_ACTUAL = (ast.Compare, ast.BoolOp, ast.IfExp, ast.Lambda, ast.NamedExpr)
ISCLOSE_OPTIONS = ("rel_tol", "abs_tol")

# (prefix, setup statements, expressions) -> per expression (True, value) or (False, why)
Oracle = Callable[[str, list[str], list[str]], list[tuple[bool, Any]]]


class BadReference(ValueError):
    """The reference's test code cannot be used (a one-line reason)."""


@dataclass(frozen=True)
class Case:
    """One converted assert: what the actual value must satisfy."""

    kind: str  # eq | ne | is | is_not | close | isclose | truth | falsy
    line: int
    expected: Any = None
    tol: Any = None
    op: str = ""  # close: "<" or "<="
    options: tuple = ()  # isclose: (name, value) pairs


@dataclass(frozen=True)
class Plan:
    test: str  # the test code the sandbox runs (converted asserts replaced)
    entry_point: str
    prefix: str
    cases: tuple[Case, ...]
    unverified: int


@dataclass
class _Draft:
    node: ast.Assert
    kind: str
    actual: ast.expr
    exprs: dict[str, ast.expr]
    op: str = ""


@dataclass
class _Scope:
    body: list[ast.stmt]  # the statements whose asserts may be converted
    others: list[ast.stmt]  # further statements that run in the sandbox as they are
    setup: list[str] = field(default_factory=list)  # what the oracle runs after the prefix
    forbidden: set[str] = field(default_factory=set)  # names a trusted expression must not use
    literal_only: bool = False
    param: str = ""  # check's parameter; "" at module level
    program_names: set[str] = field(default_factory=set)  # module level: names the test binds


def build_plan(test: str, entry_point: str, prefix: str, oracle: Oracle) -> Plan:
    """The plan for one reference; BadReference when the test code cannot be used."""
    try:
        return _build_plan(test, entry_point, prefix, oracle)
    except (RecursionError, MemoryError) as e:
        raise BadReference(f"test code too deeply nested or too large ({type(e).__name__})") from None


def _build_plan(test: str, entry_point: str, prefix: str, oracle: Oracle) -> Plan:
    tree = _parse(test, "test code")
    _parse(prefix, "import prefix")
    if entry_point:
        _check_entry_point(entry_point)
    scope = _scope(tree, entry_point)
    drafts, dropped = [], set()
    for stmt in scope.body:
        if not isinstance(stmt, ast.Assert):
            continue
        if _is_literal(stmt.test) and _literal_truth(stmt.test):
            dropped.add(id(stmt))
            continue
        draft = _match(stmt, scope)
        if draft is not None:
            drafts.append(draft)
    values = _evaluate(drafts, prefix, scope.setup, oracle)
    cases: list[Case] = []
    converted: dict[int, tuple[int, ast.expr]] = {}
    for draft, vals in zip(drafts, values):
        if vals is None:
            continue
        converted[id(draft.node)] = (len(cases), draft.actual)
        options = tuple((k, v) for k, v in vals.items() if k in ISCLOSE_OPTIONS)
        cases.append(Case(draft.kind, draft.node.lineno, vals.get("expected"), vals.get("tol"), draft.op,
                          options))
    unverified = sum(_checks_something(s) for s in scope.body + scope.others
                     if id(s) not in converted and id(s) not in dropped)
    if not cases and not unverified:
        raise BadReference("the test code checks nothing (no assert)")
    rewritten = _Rewriter(converted, dropped).visit(tree)
    ast.fix_missing_locations(rewritten)
    return Plan(ast.unparse(rewritten), entry_point, prefix, tuple(cases), unverified)


def judge(case: Case, value: Any) -> str:
    """"" when `value` (decoded from the sandbox) satisfies `case`, else why not."""
    if isinstance(value, Opaque):
        if case.kind in ("truth", "falsy"):
            return "" if value.truth == (case.kind == "truth") else "wrong answer"
        if case.kind == "is_not":
            return ""  # an object without an encoding is no None/True/False
        return f"result of type {value.type_name} cannot be compared"
    e = case.expected
    try:
        if case.kind == "eq":
            ok = value == e
        elif case.kind == "ne":
            ok = value != e
        elif case.kind == "is":
            ok = value is e
        elif case.kind == "is_not":
            ok = value is not e
        elif case.kind == "truth":
            ok = bool(value)
        elif case.kind == "falsy":
            ok = not value
        elif case.kind == "close":
            ok = abs(value - e) < case.tol if case.op == "<" else abs(value - e) <= case.tol
        elif case.kind == "isclose":
            ok = math.isclose(value, e, **dict(case.options))
        else:
            raise AssertionError(case.kind)
    except (TypeError, ValueError, ArithmeticError, RecursionError):
        ok = False
    return "" if ok is True else "wrong answer"


# --- parsing and scope ------------------------------------------------------------------------------


def _parse(source: str, what: str) -> ast.Module:
    try:
        return ast.parse(source)
    except (SyntaxError, ValueError) as e:
        raise BadReference(f"{what} does not parse: {e}") from None


def _check_entry_point(entry: str) -> None:
    """`add`, `Solution().twoSum`, `Solution.f`: names, attributes and calls without arguments."""
    try:
        node = ast.parse(entry, mode="eval")
    except SyntaxError:
        raise BadReference(f"entry point {entry!r} is not an expression") from None
    for n in ast.walk(node.body):
        if isinstance(n, ast.Call) and (n.args or n.keywords):
            raise BadReference(f"entry point {entry!r} calls with arguments")
        if not isinstance(n, (ast.Name, ast.Attribute, ast.Call, ast.Load)):
            raise BadReference(f"entry point {entry!r} is not a name, attribute or call")


def _scope(tree: ast.Module, entry_point: str) -> _Scope:
    if not entry_point:  # module level (MBPP): expected values must be literals
        bound = set().union(*(_bound(s) for s in tree.body)) if tree.body else set()
        return _Scope(body=list(tree.body), others=[], literal_only=True, program_names=bound)
    check = next((s for s in tree.body if isinstance(s, ast.FunctionDef) and s.name == "check"), None)
    if check is None:
        raise BadReference(f"entry point {entry_point!r} given but the test code defines no check()")
    params = [a.arg for a in check.args.posonlyargs + check.args.args]
    if not params:
        raise BadReference("check() takes no parameter")
    rest = [s for s in tree.body if s is not check]
    setup = [s for s in rest if _is_setup(s)]
    forbidden = {params[0]} | _bound(check, inside=True)
    for s in rest:
        if not _is_setup(s):
            forbidden |= _bound(s)
    return _Scope(body=list(check.body), others=[s for s in rest if not _is_setup(s)],
                  setup=[ast.unparse(s) for s in setup], forbidden=forbidden, param=params[0])


def _is_setup(s: ast.stmt) -> bool:
    """Module-level statements the oracle may run: deterministic, and not the program's business."""
    if isinstance(s, (ast.Import, ast.ImportFrom, ast.FunctionDef, ast.ClassDef)):
        return not (isinstance(s, ast.FunctionDef) and s.name == "check")
    if isinstance(s, ast.Assign):
        return all(isinstance(t, ast.Name) for t in s.targets) and _is_literal(s.value)
    if isinstance(s, ast.AnnAssign):
        return isinstance(s.target, ast.Name) and s.value is not None and _is_literal(s.value)
    return False


def _bound(node: ast.AST, inside: bool = False) -> set[str]:
    """Every name bound anywhere in `node` (a superset is fine: it only converts less)."""
    names: set[str] = set()
    for n in ast.walk(node):
        if n is node and inside:
            names.update(a.arg for a in _all_args(n.args))
            continue
        if isinstance(n, ast.Name) and isinstance(n.ctx, (ast.Store, ast.Del)):
            names.add(n.id)
        elif isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(n.name)
            if not isinstance(n, ast.ClassDef):
                names.update(a.arg for a in _all_args(n.args))
        elif isinstance(n, ast.Lambda):
            names.update(a.arg for a in _all_args(n.args))
        elif isinstance(n, (ast.Import, ast.ImportFrom)):
            names.update((a.asname or a.name).split(".")[0] for a in n.names)
        elif isinstance(n, ast.ExceptHandler) and n.name:
            names.add(n.name)
        elif isinstance(n, (ast.Global, ast.Nonlocal)):
            names.update(n.names)
    return names


def _all_args(a: ast.arguments) -> list[ast.arg]:
    return a.posonlyargs + a.args + a.kwonlyargs + [x for x in (a.vararg, a.kwarg) if x is not None]


# --- shapes -------------------------------------------------------------------------------------------


def _is_literal(node: ast.expr) -> bool:
    try:
        ast.literal_eval(node)
        return True
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        return False


def _literal_truth(node: ast.expr) -> bool:
    try:
        return bool(ast.literal_eval(node))
    except Exception:  # noqa: BLE001 - a literal whose truth cannot be taken is not "true"
        return False


def _names(node: ast.AST) -> set[str]:
    return {n.id for n in ast.walk(node) if isinstance(n, ast.Name)}


def _trusted(node: ast.expr, scope: _Scope) -> bool:
    if scope.literal_only:
        return _is_literal(node)
    return not (_names(node) & scope.forbidden)


def _actual_ok(node: ast.expr, scope: _Scope) -> bool:
    return not _trusted(node, scope) and not any(isinstance(n, UNSAFE_IN_ACTUAL) for n in ast.walk(node))


def _split(x: ast.expr, y: ast.expr, scope: _Scope) -> tuple[ast.expr, ast.expr] | None:
    """(actual, expected) when one side is the actual and the other trusted."""
    if _actual_ok(x, scope) and _trusted(y, scope):
        return x, y
    if _actual_ok(y, scope) and _trusted(x, scope):
        return y, x
    return None


def _func_name(f: ast.expr) -> str:
    if isinstance(f, ast.Name):
        return f.id
    return f.attr if isinstance(f, ast.Attribute) else ""


def _is_candidate_call(node: ast.expr, scope: _Scope) -> bool:
    """A direct call of the function under test: check's parameter, or (module level) a name the
    test itself does not bind and that is no builtin."""
    if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)):
        return False
    name = node.func.id
    if scope.param:
        return name == scope.param
    return name not in scope.program_names and not hasattr(builtins, name)


def _abs_diff(node: ast.expr) -> ast.BinOp | None:
    """X - Y when `node` is abs(X - Y) or math.fabs(X - Y)."""
    if not (isinstance(node, ast.Call) and _func_name(node.func) in ("abs", "fabs") and len(node.args) == 1
            and not node.keywords):
        return None
    arg = node.args[0]
    return arg if isinstance(arg, ast.BinOp) and isinstance(arg.op, ast.Sub) else None


def _match(stmt: ast.Assert, scope: _Scope) -> _Draft | None:
    t = stmt.test
    if isinstance(t, ast.Compare) and len(t.ops) == 1:
        return _match_compare(stmt, t.left, t.ops[0], t.comparators[0], scope)
    if isinstance(t, ast.Call):
        name = _func_name(t.func)
        if name in SAME_VALUE_HELPERS and len(t.args) == 2 and not t.keywords:
            pair = _split(t.args[0], t.args[1], scope)
            return _Draft(stmt, "eq", pair[0], {"expected": pair[1]}) if pair else None
        if name == "isclose" and len(t.args) == 2:
            pair = _split(t.args[0], t.args[1], scope)
            opts = {k.arg: k.value for k in t.keywords}
            if pair and all(k in ISCLOSE_OPTIONS and _trusted(v, scope) for k, v in opts.items()):
                return _Draft(stmt, "isclose", pair[0], {"expected": pair[1], **opts})
            return None
        if _is_candidate_call(t, scope) and _actual_ok(t, scope):
            return _Draft(stmt, "truth", t, {})
        return None
    if (isinstance(t, ast.UnaryOp) and isinstance(t.op, ast.Not) and _is_candidate_call(t.operand, scope)
            and _actual_ok(t.operand, scope)):
        return _Draft(stmt, "falsy", t.operand, {})
    return None


def _match_compare(stmt: ast.Assert, left: ast.expr, op: ast.cmpop, right: ast.expr,
                   scope: _Scope) -> _Draft | None:
    if isinstance(op, (ast.Eq, ast.NotEq)):
        pair = _split(left, right, scope)
        if pair is None:
            return None
        return _Draft(stmt, "eq" if isinstance(op, ast.Eq) else "ne", pair[0], {"expected": pair[1]})
    if isinstance(op, (ast.Is, ast.IsNot)):
        singleton = isinstance(right, ast.Constant) and any(right.value is c for c in (None, True, False))
        if singleton and _actual_ok(left, scope):
            return _Draft(stmt, "is" if isinstance(op, ast.Is) else "is_not", left, {"expected": right})
        return None
    if isinstance(op, (ast.Lt, ast.LtE)):
        diff, tol, strict = _abs_diff(left), right, isinstance(op, ast.Lt)
    elif isinstance(op, (ast.Gt, ast.GtE)):
        diff, tol, strict = _abs_diff(right), left, isinstance(op, ast.Gt)
    else:
        return None
    if diff is None or not _trusted(tol, scope):
        return None
    pair = _split(diff.left, diff.right, scope)
    if pair is None:
        return None
    return _Draft(stmt, "close", pair[0], {"expected": pair[1], "tol": tol}, op="<" if strict else "<=")


def _checks_something(s: ast.stmt) -> bool:
    if isinstance(s, ast.Expr) and isinstance(s.value, ast.Call):
        return True
    return any(isinstance(n, (ast.Assert, ast.Raise)) for n in ast.walk(s))


# --- evaluation and rewriting --------------------------------------------------------------------------


def _evaluate(drafts: list[_Draft], prefix: str, setup: list[str], oracle: Oracle) -> list[dict | None]:
    """Each draft's trusted values by name, or None when one of them cannot be evaluated."""
    values: list[dict | None] = [{} for _ in drafts]
    pending: list[tuple[int, str, ast.expr]] = []
    for k, draft in enumerate(drafts):
        for key, node in draft.exprs.items():
            try:
                values[k][key] = ast.literal_eval(node)
            except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
                pending.append((k, key, node))
    if pending:
        answers = oracle(prefix, setup, [ast.unparse(node) for _, _, node in pending])
        for (k, key, _), (ok, value) in zip(pending, answers):
            if ok and values[k] is not None:
                values[k][key] = value
            else:
                values[k] = None
    return values


class _Rewriter(ast.NodeTransformer):
    def __init__(self, converted: dict[int, tuple[int, ast.expr]], dropped: set[int]):
        self.converted, self.dropped = converted, dropped

    def visit_Assert(self, node: ast.Assert) -> ast.stmt:
        if id(node) in self.dropped:
            return ast.copy_location(ast.Pass(), node)
        if id(node) not in self.converted:
            return node
        index, actual = self.converted[id(node)]
        no_args = ast.arguments(posonlyargs=[], args=[], vararg=None, kwonlyargs=[], kw_defaults=[],
                                kwarg=None, defaults=[])
        call = ast.Call(func=ast.Name(CASE_FN, ast.Load()),
                        args=[ast.Constant(index), ast.Lambda(args=no_args, body=actual)], keywords=[])
        return ast.copy_location(ast.Expr(call), node)
