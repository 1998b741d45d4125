"""A calculator tool: arithmetic on an AST whitelist, never eval/exec.

Accepted: int and float literals, + - * / // % **, unary + -, parentheses, the functions in ``FUNCTIONS`` and
the constants in ``CONSTANTS``. Refused (with an error string): names, attribute access, calls of anything
else, comparisons, strings, ``^`` (the model most likely meant ``**``), exponents above ``max_exponent``,
results whose magnitude passes 10**``max_digits``. Output: integers exactly; floats rounded to 12 significant
digits, printed as integers when integral (``7/2`` -> ``3.5``, ``6/3`` -> ``2``, ``0.1+0.2`` -> ``0.3``).
"""

from __future__ import annotations

import ast
import math
import operator

from appo.tools.base import Tool

CONSTANTS = {"pi": math.pi, "e": math.e, "tau": math.tau}
FUNCTIONS = {"sqrt": math.sqrt, "exp": math.exp, "log": math.log, "log10": math.log10, "log2": math.log2,
             "sin": math.sin, "cos": math.cos, "tan": math.tan, "asin": math.asin, "acos": math.acos,
             "atan": math.atan, "floor": math.floor, "ceil": math.ceil, "abs": abs, "round": round,
             "min": min, "max": max, "factorial": math.factorial, "gcd": math.gcd}
_BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
           ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow}
_UNARY = {ast.UAdd: operator.pos, ast.USub: operator.neg}


class CalculatorError(ValueError):
    """An expression the calculator refuses or cannot evaluate."""


class CalculatorTool(Tool):
    """Evaluate one arithmetic expression; ``run`` returns the value or ``"Error: ..."``, never raises."""

    name = "calculator"
    tag = "calculator"
    max_output_chars = 256

    def __init__(self, max_exponent: int = 1000, max_digits: int = 100, max_chars: int = 500):
        for arg, value in (("max_exponent", max_exponent), ("max_digits", max_digits),
                           ("max_chars", max_chars)):
            if not value > 0:
                raise ValueError(f"{arg}: must be positive, got {value!r}")
        self.max_exponent, self.max_digits, self.max_chars = max_exponent, max_digits, max_chars

    def run(self, text: str) -> str:
        try:
            return self.truncate(format_number(self.evaluate(text)))
        except CalculatorError as error:
            return f"Error: {error}"
        except (ArithmeticError, ValueError, TypeError) as error:  # 1/0, sqrt(-1), factorial(2.5), ...
            return f"Error: {type(error).__name__}: {error}"

    def evaluate(self, text: str) -> int | float:
        """Value of the expression ``text`` (int or float). Raises CalculatorError on refused input."""
        expression = text.strip().rstrip("=").strip().replace("×", "*").replace("÷", "/").replace("−", "-")
        if not expression:
            raise CalculatorError("empty expression")
        if len(expression) > self.max_chars:
            raise CalculatorError(f"expression longer than {self.max_chars} characters")
        try:
            tree = ast.parse(expression, mode="eval")
        except SyntaxError:
            raise CalculatorError(f"not an arithmetic expression: {expression!r}") from None
        return self._eval(tree.body)

    def _eval(self, node: ast.AST) -> int | float:
        if isinstance(node, ast.Constant) and type(node.value) in (int, float):
            return self._checked(node.value)
        if isinstance(node, ast.Name) and node.id in CONSTANTS:
            return CONSTANTS[node.id]
        if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
            return _UNARY[type(node.op)](self._eval(node.operand))
        if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
            left, right = self._eval(node.left), self._eval(node.right)
            if isinstance(node.op, ast.Pow):
                self._check_power(left, right)
            return self._checked(_BINARY[type(node.op)](left, right))
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.BitXor):
            raise CalculatorError("'^' is not a power here; write a ** b")
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in FUNCTIONS:
            if node.keywords:
                raise CalculatorError("keyword arguments are not supported")
            args = [self._eval(arg) for arg in node.args]
            if node.func.id == "factorial" and args and isinstance(args[0], int) and args[0] > 500:
                raise CalculatorError("factorial argument above 500")
            return self._checked(FUNCTIONS[node.func.id](*args))
        if isinstance(node, ast.Call):
            raise CalculatorError(f"unsupported call; the functions are {', '.join(FUNCTIONS)}")
        if isinstance(node, ast.Name):
            raise CalculatorError(f"unknown name {node.id!r}")
        raise CalculatorError(f"unsupported syntax: {type(node).__name__}")

    def _check_power(self, base: int | float, exponent: int | float) -> None:
        if abs(exponent) > self.max_exponent:
            raise CalculatorError(f"exponent {exponent} exceeds the limit of {self.max_exponent}")
        if base not in (0, 1, -1) and exponent > 0 and exponent * math.log10(abs(base)) > self.max_digits:
            raise CalculatorError(f"result would exceed 10**{self.max_digits}")

    def _checked(self, value):
        if isinstance(value, complex):
            raise CalculatorError("complex result")
        if isinstance(value, float) and not math.isfinite(value):
            raise CalculatorError("result is not finite")
        if abs(value) >= 10 ** self.max_digits:
            raise CalculatorError(f"result exceeds 10**{self.max_digits}")
        return value


def format_number(value: int | float) -> str:
    """Integers exactly; floats with 12 significant digits, integral floats below 1e15 without '.0'."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise CalculatorError(f"not a number: {value!r}")
    if isinstance(value, int):
        return str(value)
    rounded = float(f"{value:.12g}")
    if rounded.is_integer() and abs(rounded) < 1e15:
        return str(int(rounded))
    return f"{rounded:.12g}"
