"""A model's input rule as JavaScript, translated from its Python source (the one implementation).

The rule's kernels are elementwise numpy (`np.where`, `np.abs`, comparisons and arithmetic over arrays
of pages). Applied to one page, each array is one number, so the same statements run in JavaScript
with numpy's elementwise functions as scalar ones (`NP_RUNTIME`): `np.where(c, a, b)` is `c ? a : b`,
`np.rint` rounds half to even as numpy does, `x.astype(...)` and `np.asarray(x, ...)` are `x`. The
numbers are IEEE doubles on both sides (int64 in numpy: exact below 2^53, as page sizes are), so
`w / h`, `abs(...)` and the comparisons of the grid walk give the same results bit for bit.

Only a small subset of Python is translated; anything else raises at generation time, naming the
construct (never a silent mistranslation). Module-level constants the kernels read are emitted
with their values; kernels they call are translated with them.
"""
from __future__ import annotations

import ast
import inspect
import json
import textwrap

NP_RUNTIME = r"""
const np = {
  where: (c, a, b) => (c ? a : b), abs: Math.abs, trunc: Math.trunc, ceil: Math.ceil, floor: Math.floor,
  maximum: Math.max, minimum: Math.min, asarray: (x) => x, full: (shape, v) => v, ones: () => 1,
  zeros: () => 0, broadcast_to: (x) => x, inf: Infinity, int64: null, bool: null, float64: null,
  rint: (x) => { const f = Math.floor(x), d = x - f; return d > 0.5 ? f + 1 : d < 0.5 ? f : (f % 2 === 0 ? f : f + 1); },
};
"""

_BINOPS = {ast.Add: "+", ast.Sub: "-", ast.Mult: "*", ast.Div: "/", ast.Pow: "**", ast.Mod: "%",
           ast.BitOr: "||", ast.BitAnd: "&&"}     # | and & act on booleans in the kernels
_CMPOPS = {ast.Eq: "==", ast.NotEq: "!=", ast.Lt: "<", ast.LtE: "<=", ast.Gt: ">", ast.GtE: ">="}
_DROPPED_METHODS = ("astype", "ravel")           # no-ops on one number


class Untranslatable(ValueError):
    pass


def translate(*functions) -> str:
    """JavaScript for `functions`, the kernels they call (same module) and the constants they read."""
    done: dict[str, str] = {}
    consts: dict[str, object] = {}
    todo = list(functions)
    while todo:
        fn = todo.pop()
        if fn.__name__ in done:
            continue
        t = _Function(fn)
        done[fn.__name__] = t.js
        consts.update(t.constants)
        todo += [f for f in t.calls if f.__name__ not in done]
    head = [f"const {k} = {json.dumps(v)};" for k, v in sorted(consts.items())]
    return "\n".join(head + list(reversed(done.values())))


class _Function:
    def __init__(self, fn):
        self.fn = fn
        self.globals = fn.__globals__
        tree = ast.parse(textwrap.dedent(inspect.getsource(fn)))
        node = tree.body[0]
        if not isinstance(node, ast.FunctionDef):
            raise Untranslatable(f"{fn.__name__}: not a function definition")
        self.constants: dict[str, object] = {}
        self.calls: list = []
        self.locals = {a.arg for a in node.args.args}
        assigned = sorted({n.id for n in ast.walk(node) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)}
                          - self.locals)
        self.locals |= set(assigned)
        body = [f"  let {', '.join(assigned)};"] if assigned else []
        body += self.block(node.body, "  ")
        args = ", ".join(a.arg for a in node.args.args)
        self.js = f"// {fn.__module__}.{fn.__name__}, translated\nfunction {fn.__name__}({args}) {{\n" + \
            "\n".join(body) + "\n}"

    def fail(self, node, what: str = ""):
        raise Untranslatable(f"{self.fn.__name__} line {getattr(node, 'lineno', '?')}: cannot translate "
                             f"{what or type(node).__name__}: {ast.unparse(node)}")

    # ---- statements ------------------------------------------------------------------------
    def block(self, stmts, pad: str) -> list[str]:
        out = []
        for s in stmts:
            if isinstance(s, ast.Expr) and isinstance(s.value, ast.Constant) and isinstance(s.value.value, str):
                continue   # a docstring
            out += self.stmt(s, pad)
        return out

    def stmt(self, s, pad: str) -> list[str]:
        if isinstance(s, ast.Assign) and len(s.targets) == 1:
            return [f"{pad}{self.target(s.targets[0])} = {self.expr(s.value)};"]
        if isinstance(s, ast.AugAssign) and type(s.op) in _BINOPS:
            return [f"{pad}{self.target(s.target)} {_BINOPS[type(s.op)]}= {self.expr(s.value)};"]
        if isinstance(s, ast.Return):
            return [f"{pad}return {self.expr(s.value)};"]
        if isinstance(s, ast.For) and not s.orelse:
            head = f"{pad}for (const {self.target(s.target)} of {self.expr(s.iter)}) {{"
            return [head] + self.block(s.body, pad + "  ") + [f"{pad}}}"]
        if isinstance(s, ast.If):
            out = [f"{pad}if ({self.expr(s.test)}) {{"] + self.block(s.body, pad + "  ")
            if s.orelse:
                out += [f"{pad}}} else {{"] + self.block(s.orelse, pad + "  ")
            return out + [f"{pad}}}"]
        self.fail(s)

    def target(self, t) -> str:
        if isinstance(t, ast.Name):
            return t.id
        if isinstance(t, ast.Tuple):
            return "[" + ", ".join(self.target(e) for e in t.elts) + "]"
        self.fail(t, "an assignment target")

    # ---- expressions -----------------------------------------------------------------------
    def expr(self, e) -> str:
        if isinstance(e, ast.Constant):
            if isinstance(e.value, bool):
                return "true" if e.value else "false"
            if isinstance(e.value, (int, float, str)) and not isinstance(e.value, complex):
                return json.dumps(e.value)
            self.fail(e, "a constant")
        if isinstance(e, ast.Name):
            return self.name(e)
        if isinstance(e, ast.BinOp) and type(e.op) in _BINOPS:
            return f"({self.expr(e.left)} {_BINOPS[type(e.op)]} {self.expr(e.right)})"
        if isinstance(e, ast.BinOp) and isinstance(e.op, ast.FloorDiv):
            return f"Math.floor({self.expr(e.left)} / {self.expr(e.right)})"
        if isinstance(e, ast.UnaryOp):
            op = {ast.USub: "-", ast.Not: "!", ast.Invert: "!"}.get(type(e.op))   # ~ on booleans
            if op is None:
                self.fail(e)
            return f"({op}{self.expr(e.operand)})"
        if isinstance(e, ast.BoolOp):
            op = " && " if isinstance(e.op, ast.And) else " || "
            return "(" + op.join(self.expr(v) for v in e.values) + ")"
        if isinstance(e, ast.Compare):
            parts, left = [], e.left
            for op, right in zip(e.ops, e.comparators):
                if type(op) not in _CMPOPS:
                    self.fail(e, "a comparison")
                parts.append(f"({self.expr(left)} {_CMPOPS[type(op)]} {self.expr(right)})")
                left = right
            return parts[0] if len(parts) == 1 else "(" + " && ".join(parts) + ")"
        if isinstance(e, ast.IfExp):
            return f"({self.expr(e.test)} ? {self.expr(e.body)} : {self.expr(e.orelse)})"
        if isinstance(e, ast.Tuple):
            return "[" + ", ".join(self.expr(x) for x in e.elts) + "]"
        if isinstance(e, ast.Dict):
            if any(k is None for k in e.keys):
                self.fail(e, "a ** in a dict")
            return "{" + ", ".join(f"[{self.expr(k)}]: {self.expr(v)}" for k, v in zip(e.keys, e.values)) + "}"
        if isinstance(e, ast.Subscript):
            return f"{self.expr(e.value)}[{self.expr(e.slice)}]"
        if isinstance(e, ast.Attribute):
            if e.attr == "shape":
                return "null"      # an array's shape: one number has none (np.zeros/np.full ignore it)
            if isinstance(e.value, ast.Name) and e.value.id == "np":
                return f"np.{e.attr}"
            self.fail(e, "an attribute")
        if isinstance(e, ast.Call):
            return self.call(e)
        self.fail(e)

    def name(self, e) -> str:
        if e.id in self.locals or e.id == "np":
            return e.id
        if e.id in ("True", "False"):
            return e.id.lower()
        v = self.globals.get(e.id)
        if inspect.isfunction(v) and v.__module__ == self.fn.__module__:
            self.calls.append(v)
            return e.id
        if isinstance(v, (int, float, str, dict, tuple, list)) and not isinstance(v, bool):
            json.dumps(v)   # plain data only
            self.constants[e.id] = v
            return e.id
        self.fail(e, "a name")

    def call(self, e) -> str:
        f = e.func
        args = [self.expr(a) for a in e.args]   # keywords (dtype=...) mean nothing for one number
        if any(k.arg is None for k in e.keywords):
            self.fail(e, "a ** call")
        if isinstance(f, ast.Attribute) and f.attr in _DROPPED_METHODS and not args:
            return self.expr(f.value)
        if isinstance(f, ast.Attribute) and f.attr in _DROPPED_METHODS and len(args) == 1:
            return self.expr(f.value)
        if isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name) and f.value.id == "np":
            return f"np.{f.attr}({', '.join(args)})"
        if isinstance(f, ast.Name) and f.id == "abs":
            return f"Math.abs({', '.join(args)})"
        if isinstance(f, ast.Name):
            return f"{self.name(f)}({', '.join(args)})"
        self.fail(e, "a call")
