"""Cost expressions as JavaScript: exact integers (BigInt) or floats (Number), for the explorer page.

sympy's own jscode printer writes Numbers (floats: a cost past 2^53 rounds, a floor of a ratio can
round the wrong way), so the page uses this small printer instead. Every expression is carried as a
fraction num/den of integer-valued code (den > 0): a sum of terms with rational coefficients is put
over the lcm of its denominators, floor and ceiling are exact integer divisions of the fraction, a
comparison cross-multiplies, and the integer result is num/den, checked exact at run time (`ediv`
throws on a remainder: a cost that is not an integer is a bug to see, not to round).

Expressions read their symbols from an object `v` by name (`v.w_crop`); the helpers (`RUNTIME`) are
emitted once in the page.
"""
from __future__ import annotations

from math import lcm

import sympy as sp

# fdiv/cdiv: floor and ceiling of a/b for b > 0 (BigInt `/` truncates toward zero); ediv: an exact
# quotient. The Number versions are for the roofline, whose seconds are floats in the CLI too.
RUNTIME = r"""
const fdiv = (a, b) => { const q = a / b; return (a % b !== 0n && a < 0n) ? q - 1n : q; };
const cdiv = (a, b) => -fdiv(-a, b);
const ediv = (a, b) => { if (a % b !== 0n) throw new Error(`not an integer: ${a}/${b}`); return a / b; };
const bmin = (...x) => x.reduce((a, b) => (b < a ? b : a));
const bmax = (...x) => x.reduce((a, b) => (b > a ? b : a));
const ffdiv = (a, b) => Math.floor(a / b);
const fcdiv = (a, b) => Math.ceil(a / b);
const fediv = (a, b) => a / b;
"""


class JSPrinter:
    """`code(expr)`: JavaScript for an integer-valued expression; `exact=True`: BigInt, else Number."""

    def __init__(self, exact: bool = True, var: str = "v"):
        self.exact, self.var = exact, var

    # ---- literals and helpers ---------------------------------------------------------------
    def lit(self, n: int) -> str:
        return f"{n}n" if self.exact else (f"({n})" if n < 0 else str(n))

    def _call(self, name: str, *args: str) -> str:
        return f"{name if self.exact else 'f' + name}({', '.join(args)})"

    def code(self, expr) -> str:
        num, den = self.frac(sp.sympify(expr))
        return num if den == 1 else self._call("ediv", num, self._den(den))

    def _den(self, den) -> str:
        return self.lit(den) if isinstance(den, int) else den

    # ---- fractions: (numerator code, denominator: an int or code of a positive integer) --------
    def frac(self, e) -> tuple[str, int | str]:
        if e.is_Integer:
            return self.lit(int(e)), 1
        if e.is_Rational:
            return self.lit(int(e.p)), int(e.q)
        if e.is_Symbol:
            return f"{self.var}.{e.name}", 1
        if isinstance(e, sp.Add):
            return self._add(e.args)
        if isinstance(e, sp.Mul):
            return self._mul(e.args)
        if isinstance(e, sp.Pow):
            return self._pow(e)
        if isinstance(e, (sp.floor, sp.ceiling)):
            num, den = self.frac(e.args[0])
            if den == 1:
                return num, 1
            return self._call("fdiv" if isinstance(e, sp.floor) else "cdiv", num, self._den(den)), 1
        if isinstance(e, sp.Piecewise):
            return self._piecewise(e)
        if isinstance(e, (sp.Min, sp.Max)):
            return self._minmax(e)
        raise NotImplementedError(f"no JavaScript for {type(e).__name__}: {e}")

    def _add(self, args) -> tuple[str, int | str]:
        fr = [self.frac(a) for a in args]
        if all(isinstance(d, int) for _, d in fr):
            den = lcm(*[d for _, d in fr])
            parts = [n if den // d == 1 else f"{self.lit(den // d)} * {n}" for n, d in fr]
            return "(" + " + ".join(parts) + ")", den
        num, den = fr[0]
        for n, d in fr[1:]:   # a/b + c/d = (a*d + c*b) / (b*d)
            num = f"({num} * {self._den(d)} + {n} * {self._den(den)})"
            den = self._times(den, d)
        return num, den

    def _times(self, a, b):
        if isinstance(a, int) and isinstance(b, int):
            return a * b
        return f"({self._den(a)} * {self._den(b)})"

    def _mul(self, args) -> tuple[str, int | str]:
        nums, den = [], 1
        for a in args:
            n, d = self.frac(a)
            if n != self.lit(1):
                nums.append(n)
            if d != 1:
                den = self._times(den, d)
        if not nums:
            return self.lit(1), den
        return "(" + " * ".join(nums) + ")", den

    def _pow(self, e) -> tuple[str, int | str]:
        base, k = e.args
        if not (k.is_Integer and k != 0):
            raise NotImplementedError(f"no JavaScript for a power {e} (an integer exponent only)")
        k = int(k)
        n, d = self.frac(base)
        if k < 0:
            if not base.is_positive:
                raise NotImplementedError(f"1/({base}) needs a base known positive")
            n, d = (self._den(d), n)
            k = -k
            return self._ipow(n, k), self._ipow_den(d, k)
        return self._ipow(n, k), self._ipow_den(d, k)

    def _ipow(self, code: str, k: int) -> str:
        return code if k == 1 else f"({code} ** {self.lit(k)})"

    def _ipow_den(self, d, k: int):
        if isinstance(d, int):
            return d ** k
        return self._ipow(d, k)

    def _piecewise(self, e) -> tuple[str, int]:
        out = None
        for value, cond in reversed(e.args):
            code = self.code(value)
            if cond == sp.true:
                out = code
            else:
                out = f"({self.cond(cond)} ? {code} : {out if out is not None else self._none(e)})"
        return out, 1

    def _none(self, e) -> str:
        return f"(() => {{ throw new Error('no case of a Piecewise applies'); }})()"

    def _minmax(self, e) -> tuple[str, int]:
        fr = [self.frac(a) for a in e.args]
        if not all(isinstance(d, int) for _, d in fr):
            raise NotImplementedError(f"no JavaScript for {e} (a symbolic denominator in a Min/Max)")
        den = lcm(*[d for _, d in fr])
        parts = [n if den // d == 1 else f"{self.lit(den // d)} * {n}" for n, d in fr]
        name = "min" if isinstance(e, sp.Min) else "max"
        call = f"bmin({', '.join(parts)})".replace("bmin", "b" + name) if self.exact else \
            f"Math.{name}({', '.join(parts)})"
        return call, den

    # ---- conditions ---------------------------------------------------------------------------
    def cond(self, c) -> str:
        if c == sp.true:
            return "true"
        if c == sp.false:
            return "false"
        if isinstance(c, sp.And):
            return "(" + " && ".join(self.cond(a) for a in c.args) + ")"
        if isinstance(c, sp.Or):
            return "(" + " || ".join(self.cond(a) for a in c.args) + ")"
        if isinstance(c, sp.Not):
            return f"!{self.cond(c.args[0])}"
        ops = {sp.Eq: "==", sp.Ne: "!=", sp.Lt: "<", sp.Le: "<=", sp.Gt: ">", sp.Ge: ">="}
        for kind, op in ops.items():
            if isinstance(c, kind):
                (an, ad), (bn, bd) = self.frac(c.lhs), self.frac(c.rhs)
                left = an if bd == 1 else f"{an} * {self._den(bd)}"
                right = bn if ad == 1 else f"{bn} * {self._den(ad)}"
                return f"({left} {op} {right})"
        raise NotImplementedError(f"no JavaScript for the condition {c}")


def function(expr, exact: bool = True) -> str:
    """`(v) => ...`: one expression as a JavaScript arrow function of the symbol values."""
    return f"(v) => {JSPrinter(exact).code(expr)}"
