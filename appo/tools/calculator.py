"""A calculator tool: arithmetic on an AST whitelist, never eval/exec, in a worker process with a time limit.

Accepted: int and float literals, + - * / // % **, unary + -, parentheses, the functions in ``FUNCTIONS`` and
the constants in ``CONSTANTS``. Refused (with an error string): names, attribute access, calls of anything
else, comparisons, strings, ``^`` (the model most likely meant ``**``), exponents above ``max_exponent``,
operands and results whose magnitude passes 10**``max_digits``, rounding to more than ``max_digits`` digits
either way, factorials above 500. Output: integers exactly; floats rounded to 12 significant digits, printed as
integers when integral (``7/2`` -> ``3.5``, ``6/3`` -> ``2``, ``0.1+0.2`` -> ``0.3``).

Model text is hostile, so the expression is parsed and evaluated in a small worker process, never in the
caller's: the worker answers each call within ``time_limit_s`` or is killed (and restarted on the next call),
so no input can hang or crash the trainer (deep nesting, huge numbers, a slow builtin).
"""

from __future__ import annotations

import ast
import json
import math
import operator
import os
import selectors
import subprocess
import sys
import threading
import time

from appo.tools.base import Tool

CONSTANTS = {"pi": math.pi, "e": math.e, "tau": math.tau}
FUNCTIONS = {"sqrt": math.sqrt, "exp": math.exp, "log": math.log, "log10": math.log10, "log2": math.log2,
             "sin": math.sin, "cos": math.cos, "tan": math.tan, "asin": math.asin, "acos": math.acos,
             "atan": math.atan, "floor": math.floor, "ceil": math.ceil, "abs": abs, "round": round,
             "min": min, "max": max, "factorial": math.factorial, "gcd": math.gcd}
_BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
           ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow}
_UNARY = {ast.UAdd: operator.pos, ast.USub: operator.neg}
_PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class CalculatorError(ValueError):
    """An expression the calculator refuses or cannot evaluate."""


class CalculatorTool(Tool):
    """Evaluate one arithmetic expression in the worker; ``run`` returns the value or ``"Error: ..."``, never
    raises. max_exponent / max_digits / max_chars: the bounds above; time_limit_s: per call, in the worker."""

    name = "calculator"
    tag = "calculator"
    max_output_chars = 256
    parallel = False  # one worker, one call at a time (each takes microseconds)

    def __init__(self, max_exponent: int = 1000, max_digits: int = 100, max_chars: int = 500,
                 time_limit_s: float = 0.5):
        self.evaluator = Evaluator(max_exponent, max_digits, max_chars)
        if isinstance(time_limit_s, bool) or not isinstance(time_limit_s, (int, float)) or not time_limit_s > 0:
            raise ValueError(f"time_limit_s: must be a positive number of seconds, got {time_limit_s!r}")
        self.time_limit_s = float(time_limit_s)
        self._worker: subprocess.Popen | None = None
        self._lock = threading.Lock()

    def run(self, text: str) -> str:
        if not isinstance(text, str):
            return f"Error: expected text, got {type(text).__name__}"
        if len(text) > 4 * self.evaluator.max_chars:  # refused before it is even sent
            return f"Error: expression longer than {self.evaluator.max_chars} characters"
        with self._lock:
            try:
                return self.truncate(self._ask(text))
            except OSError as error:
                self._stop_worker()
                return f"Error: the calculator failed: {type(error).__name__}: {error}"

    def _ask(self, text: str) -> str:
        worker = self._start_worker()
        worker.stdin.write((json.dumps(text) + "\n").encode())
        worker.stdin.flush()
        deadline = time.monotonic() + self.time_limit_s
        line = b""
        fd = worker.stdout.fileno()
        with selectors.DefaultSelector() as selector:
            selector.register(fd, selectors.EVENT_READ)
            while not line.endswith(b"\n"):
                left = deadline - time.monotonic()
                if left <= 0 or not selector.select(timeout=left):
                    self._stop_worker()
                    return f"Error: the calculation exceeded the time limit of {self.time_limit_s:g} s"
                chunk = os.read(fd, 65536)
                if not chunk:
                    self._stop_worker()
                    return "Error: the calculator stopped (out of memory?)"
                line += chunk
        return json.loads(line)

    def _start_worker(self) -> subprocess.Popen:
        if self._worker is None or self._worker.poll() is not None:
            options = json.dumps([self.evaluator.max_exponent, self.evaluator.max_digits, self.evaluator.max_chars])
            launcher = (f"import sys; sys.path.insert(0, {_PACKAGE_ROOT!r}); "
                        "from appo.tools.calculator import _serve; _serve()")
            self._worker = subprocess.Popen([sys.executable, "-I", "-S", "-B", "-c", launcher, options],
                                            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                            stderr=subprocess.DEVNULL, start_new_session=True)
        return self._worker

    def _stop_worker(self) -> None:
        if self._worker is not None:
            self._worker.kill()
            self._worker.wait()
            self._worker.stdin.close()
            self._worker.stdout.close()
            self._worker = None

    def __del__(self):
        try:
            self._stop_worker()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass


class Evaluator:
    """The AST walker the worker runs (trusted callers may use it directly: it runs in the calling process)."""

    def __init__(self, max_exponent: int = 1000, max_digits: int = 100, max_chars: int = 500):
        for arg, value in (("max_exponent", max_exponent), ("max_digits", max_digits),
                           ("max_chars", max_chars)):
            if isinstance(value, bool) or not isinstance(value, int) or not value > 0:
                raise ValueError(f"{arg}: must be a positive integer, got {value!r}")
        self.max_exponent, self.max_digits, self.max_chars = max_exponent, max_digits, max_chars
        self._bound = 10 ** max_digits

    def text(self, expression: str) -> str:
        """The calculator's answer to ``expression``: the formatted value or ``"Error: ..."``."""
        try:
            return format_number(self.evaluate(expression))
        except CalculatorError as error:
            return f"Error: {error}"
        except (ArithmeticError, ValueError, TypeError) as error:  # 1/0, sqrt(-1), factorial(2.5), ...
            return f"Error: {type(error).__name__}: {error}"
        except (RecursionError, MemoryError):
            return "Error: expression too deeply nested or too large"

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
            if node.func.id == "round" and len(args) > 1 and isinstance(args[1], (int, float)) \
                    and abs(args[1]) > self.max_digits:
                raise CalculatorError(f"rounding to more than {self.max_digits} digits")
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
        if abs(value) >= self._bound:
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


def _serve() -> None:
    """The worker's loop: one json string per input line -> one json answer per output line; exits at EOF."""
    import ctypes
    import resource
    import signal
    ctypes.CDLL(None).prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG: die with the parent
    resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))
    evaluator = Evaluator(*json.loads(sys.argv[1]))
    for line in sys.stdin:
        try:
            answer = evaluator.text(json.loads(line))
        except Exception as error:  # noqa: BLE001 - a bad line: answer it, keep serving
            answer = f"Error: {type(error).__name__}"
        sys.stdout.write(json.dumps(answer) + "\n")
        sys.stdout.flush()
