"""The sandbox side of the code reward: runs as ``main.py`` inside the sandbox, never imported by
the scorer (``rewards/code.py`` ships this file's text).

It reports what the program *produced*, never whether a test passed: the scorer holds the
expected values and decides. Everything here runs in the same process as the program, which can
rewrite any of it, so nothing here is trusted; the design only makes sure an honest run reports
faithfully and that a forged report can carry nothing but outputs.

Input: one JSON object on stdin (read, then stdin is pointed at /dev/null), with ``mode``:
- ``call``: load the program, then call ``fn_name`` (``Solution().fn_name`` when the program
  defines that class) with each argument list of ``inputs``, in order;
- ``assert``: load the program, run the rewritten test code (``rewards/asserts.py``), whose
  converted asserts call ``__or1_case__(i, lambda: <actual value>)``; with ``entry_point``, call
  its ``check`` with the entry point (re-evaluated per call when it builds an object, e.g.
  ``Solution().twoSum``: a fresh instance per call, as LeetCode's judge does);
- ``oracle``: no program: run the reference's prefix and setup, then evaluate each expected-value
  expression of ``exprs`` (a failing one is reported and the rest go on).
"Load the program": exec ``prelude``, then ``prefix`` (the reference's own imports and helpers,
e.g. LeetCode's ListNode) in a namespace of its own, then the program over both. Test code sees
the builtins, the prefix and what the program defined, but not the prelude (so the prelude's
``operator.add`` never stands in for a missing ``add``).

Output: JSON lines on the result channel (fd ``sys.argv[1]``):
``{"i": k, "v": VALUE}`` case k's result; ``{"i": k, "u": TYPE, "t": BOOL}`` a result that has no
encoding (its type and truth value); ``{"i": k, "e": TEXT}`` case k raised or timed out (the run
stops there, except in ``oracle`` mode); last ``{"done": true}``, or ``{"done": false, "e": TEXT}``
when something outside a case failed. VALUE is JSON where every object is a tag: ``{"t": [...]}``
tuple, ``{"d": [[k, v], ...]}`` dict, ``{"s": [...]}`` set, ``{"b": latin-1 text}`` bytes,
``{"c": [re, im]}`` complex, ``{"L": [...]}`` a linked list's values (an object with ``val`` and
``next``), ``{"T": [...]}`` a binary tree in LeetCode's level order with ``null`` for missing
children, trailing nulls dropped (an object with ``val``, ``left`` and ``right``).

Time: each case (and the program's top level) gets ``timeout_s`` of wall time (SIGALRM); the whole
run gets ``budget_s``, which also bounds the test code outside cases. Keep this file runnable by
any Python >= 3.8 (the sandbox's interpreter may be a system one).
"""

import json
import os
import signal
import sys
import time

MAX_DEPTH = 100  # nesting of one encoded result
MAX_NODES = 1000000  # nodes of one linked list or tree (a cycle would never end)
CASE_FN = "__or1_case__"


class CaseTimeout(BaseException):
    """Raised by SIGALRM: a BaseException, so the program's `except Exception` lets it through."""


def _expire(signum, frame):
    raise CaseTimeout()


class Clock:
    """One ITIMER_REAL: `case()` arms min(timeout_s, what is left of the budget), `budget()` the rest."""

    def __init__(self, timeout_s, budget_s):
        self.timeout_s, self.end = timeout_s, time.monotonic() + budget_s

    def _arm(self, seconds):
        signal.setitimer(signal.ITIMER_REAL, max(0.001, seconds))

    def case(self):
        self._arm(min(self.timeout_s, self.end - time.monotonic()))

    def budget(self):
        self._arm(self.end - time.monotonic())

    def stop(self):
        signal.setitimer(signal.ITIMER_REAL, 0)


class Channel:
    def __init__(self, fd):
        self.fd = fd

    def send(self, record):
        view = memoryview((json.dumps(record) + "\n").encode("ascii"))
        while view:
            view = view[os.write(self.fd, view):]


def encode(o, depth=0):
    """A result as tagged JSON (see the module doc); TypeError/ValueError when it has none."""
    if depth > MAX_DEPTH:
        raise ValueError("result nested too deeply")
    if o is None or o is True or o is False:
        return o
    if isinstance(o, int):
        return int(o)
    if isinstance(o, float):
        return float(o)
    if isinstance(o, str):
        return str(o)
    d = depth + 1
    if isinstance(o, list):
        return [encode(x, d) for x in o]
    if isinstance(o, tuple):
        return {"t": [encode(x, d) for x in o]}
    if isinstance(o, dict):
        return {"d": [[encode(k, d), encode(v, d)] for k, v in o.items()]}
    if isinstance(o, (set, frozenset)):
        return {"s": [encode(x, d) for x in o]}
    if isinstance(o, (bytes, bytearray)):
        return {"b": bytes(o).decode("latin-1")}
    if isinstance(o, complex):
        return {"c": [o.real, o.imag]}
    if hasattr(o, "val") and hasattr(o, "left") and hasattr(o, "right"):
        return {"T": _tree_values(o, d)}
    if hasattr(o, "val") and hasattr(o, "next"):
        return {"L": _list_values(o, d)}
    raise TypeError(f"result of type {type(o).__name__} has no encoding")


def _list_values(node, depth):
    values = []
    while node is not None:
        if len(values) >= MAX_NODES:
            raise ValueError(f"linked list longer than {MAX_NODES} nodes (a cycle?)")
        values.append(encode(node.val, depth))
        node = node.next
    return values


def _tree_values(root, depth):
    values, queue, k = [], [root], 0
    while k < len(queue):
        if len(queue) > 2 * MAX_NODES + 1:
            raise ValueError(f"tree larger than {MAX_NODES} nodes (a cycle?)")
        node = queue[k]
        k += 1
        if node is None:
            values.append(None)
            continue
        values.append(encode(node.val, depth))
        queue.append(node.left)
        queue.append(node.right)
    while values and values[-1] is None:
        values.pop()
    return values


def send_value(chan, i, value):
    try:
        chan.send({"i": i, "v": encode(value)})
    except (TypeError, ValueError, RecursionError):
        chan.send({"i": i, "u": type(value).__name__, "t": bool(value)})


def load_program(spec, clock):
    """(prefix namespace, names the program defined), after running prelude, prefix and program."""
    clock.case()
    base = {"__name__": "__main__", "__builtins__": __builtins__}
    exec(compile(spec["prelude"], "<prelude>", "exec"), base)
    ref = {"__name__": "__main__", "__builtins__": __builtins__}
    exec(compile(spec["prefix"], "<prefix>", "exec"), ref)
    g = dict(base)
    g.update(ref)
    before = dict(g)
    exec(compile(spec["source"], "solution.py", "exec"), g)
    clock.stop()
    return ref, {k: v for k, v in g.items() if k not in before or v is not before[k]}


def resolve(defined, name):
    cls = defined.get("Solution")
    if isinstance(cls, type) and hasattr(cls, name):
        return getattr(cls(), name)
    if callable(defined.get(name)):
        return defined[name]
    raise NameError(f"function {name!r} is not defined")


def run_call(spec, chan, clock, state):
    fn = resolve(load_program(spec, clock)[1], spec["fn_name"])
    for i, args in enumerate(spec["inputs"]):
        state["case"] = i
        clock.case()
        value = fn(*args)
        send_value(chan, i, value)
        state["case"] = None
        clock.stop()


def run_assert(spec, chan, clock, state):
    ref, defined = load_program(spec, clock)
    t = {"__name__": "__main__", "__builtins__": __builtins__}
    t.update((k, v) for k, v in ref.items() if not k.startswith("__"))
    t.update(defined)

    def case(i, thunk):
        state["case"] = i
        clock.case()
        value = thunk()
        send_value(chan, i, value)
        state["case"] = None
        clock.budget()

    t[CASE_FN] = case
    clock.budget()
    exec(compile(spec["test"], "test.py", "exec"), t)
    entry = spec["entry_point"]
    if entry:
        if "(" in entry:  # builds an object: a fresh one per call
            code = compile(entry, "<entry_point>", "eval")

            def candidate(*args, **kwargs):
                return eval(code, t)(*args, **kwargs)
        else:
            candidate = eval(entry, t)
        t["check"](candidate)
    clock.stop()


def run_oracle(spec, chan, clock, state):
    ref = {"__name__": "__main__", "__builtins__": __builtins__}
    clock.case()
    exec(compile(spec["prefix"], "<prefix>", "exec"), ref)
    for source in spec["setup"]:
        try:
            exec(compile(source, "<setup>", "exec"), ref)
        except Exception:
            pass  # names it would define stay undefined: expressions using them fail below
    clock.stop()
    for i, source in enumerate(spec["exprs"]):
        state["case"] = i
        clock.case()
        try:
            value = eval(compile(source, "<expected>", "eval"), ref)
        except Exception as e:
            chan.send({"i": i, "e": describe(e)})
        else:
            send_value(chan, i, value)
        state["case"] = None
        clock.stop()


def describe(e):
    if isinstance(e, CaseTimeout):
        return "timeout"
    if isinstance(e, SystemExit):
        return f"program exited ({e.code!r}) before the tests finished"
    return f"{type(e).__name__}: {e}"[:300]


def main():
    chan = Channel(int(sys.argv[1]))
    spec = json.loads(sys.stdin.read())
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    sys.stdin = open(os.devnull)
    signal.signal(signal.SIGALRM, _expire)
    clock = Clock(spec["timeout_s"], spec["budget_s"])
    state = {"case": None}
    runner = {"call": run_call, "assert": run_assert, "oracle": run_oracle}[spec["mode"]]
    try:
        runner(spec, chan, clock, state)
        done = {"done": True}
    except BaseException as e:  # noqa: BLE001 - whatever the program raised is its result
        clock.stop()
        if state["case"] is not None:
            chan.send({"i": state["case"], "e": describe(e)})
        done = {"done": False, "e": describe(e)}
    chan.send(done)


if __name__ == "__main__":
    main()
