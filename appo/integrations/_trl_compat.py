"""TRL's private surface: every name of TRL's internals that ``appo.integrations.trl`` uses, in one place.

``APPOTrainer`` subclasses TRL's ``GRPOTrainer``. The points where it hooks in (generation, rewards, the
micro-step buffer, the tool loop, the tool-result tokens) and the state it reads there are TRL internals, not
API, and change between releases. They live here, in ``GRPOSurface``, the class ``APPOTrainer`` derives from;
``appo/integrations/trl.py`` touches none of them. At import this module checks the installed TRL for every
one of them (the helpers' modules, each method and its parameters, the length of the tuples it returns where
appo unpacks them, each attribute GRPOTrainer's source assigns) and fails with one line naming the supported
versions and the first name missing, e.g.::

    ImportError: appo.integrations.trl supports trl>=1.16.0,<1.17; trl 1.0.0 lacks GRPOTrainer._tokenizer

Two of the overrides close holes of TRL's own tool loop (docs/integrations.md, "What a reward reads"):

- ``_get_tool_suffix_ids``: a tool's result reaches the model's context as plain text (``escape_tool_output``,
  then ``appo.rollout.tool_loop.encode_plain``): a result that spells ``<|im_end|>`` or ``<|im_start|>`` stays
  text, never the chat-role token; only the chat template's own text is tokenized as TRL does.
- ``_calculate_rewards``: every reward function also receives ``graded_completions``, the text appo grades
  (``appo.rollout.tool_loop.graded_text``: the model's own tokens, each tool result an empty
  ``<result></result>`` block).
"""

from __future__ import annotations

import ast
import importlib
import inspect
import re
import textwrap
import warnings

import trl
from packaging.version import Version

from appo.rollout.tool_loop import encode_plain, graded_text
from appo.tasks.parsing import escape_tool_output

SUPPORTED = "trl>=1.16.0,<1.17"
_LOWEST, _BELOW = Version("1.16.0"), Version("1.17")

GRADED = "graded_completions"  # the reward-function keyword that holds the graded text of each completion

# Module-level helpers, imported from TRL's submodules (not exported by ``trl`` itself).
HELPERS = {"trl.chat_template_utils": ("parse_response",), "trl.data_utils": ("is_conversational",),
           "trl.models.utils": ("disable_gradient_checkpointing",),
           "trl.trainer.utils": ("split_tensor_dict",)}
# GRPOTrainer methods overridden or called here -> the parameters appo passes (after self), in order.
METHODS = {
    "_generate_and_score_completions": ("inputs",),
    "_generate": ("prompts",),
    "_calculate_rewards": ("inputs", "prompts", "completions", "completion_ids_list"),
    "_prepare_inputs": ("generation_batch",),
    "_tool_call_loop": ("prompts", "prompt_ids", "completion_ids", "completions", "logprobs", "images",
                        "multimodal_fields"),
    "_get_tool_suffix_ids": ("tool_messages",),
}
# Methods whose returned tuple is unpacked here -> its length.
RESULT_LENGTHS = {"_generate": 8, "_tool_call_loop": 7}
# Attributes read or set here (the private ones, and ``eos_token_ids``, public but only since trl 1.14.2).
ATTRIBUTES = ("_tokenizer", "_is_vlm", "_step", "_buffered_inputs", "_metrics", "_pending_extra_logs",
              "_pending_metrics", "_sync_tool_dicts", "_async_tool_dicts", "eos_token_ids", "chat_template",
              "chat_template_kwargs", "max_tool_calling_iterations")


def _fail(version: str, missing: str) -> ImportError:
    return ImportError(f"appo.integrations.trl supports {SUPPORTED}; trl {version} lacks {missing}")


def _source_tree(obj) -> ast.AST | None:
    """The parsed source of a class or function, None where Python has no source for it."""
    try:
        return ast.parse(textwrap.dedent(inspect.getsource(obj)))
    except (OSError, TypeError, SyntaxError):
        return None


def _returned_lengths(function) -> set[int] | None:
    """Lengths of the tuples ``function`` returns (its own ``return`` statements, not nested functions'); None
    without source."""
    tree = _source_tree(function)
    if tree is None:
        return None
    body = tree.body[0]
    lengths, stack = set(), list(ast.iter_child_nodes(body))
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.ClassDef)):
            continue
        if isinstance(node, ast.Return) and node.value is not None:
            lengths.add(len(node.value.elts) if isinstance(node.value, ast.Tuple) else -1)
        stack.extend(ast.iter_child_nodes(node))
    return lengths


def _assigned_attributes(trainer_class) -> set[str] | None:
    """Every ``self.<name>`` that the source of ``trainer_class`` and of its base classes up to transformers'
    ``Trainer`` (not included) assigns, plus the class attributes; None where no source is available."""
    names, seen_source = set(dir(trainer_class)), False
    for cls in trainer_class.__mro__:
        if cls.__module__.split(".")[0] in ("transformers", "builtins", "torch"):
            continue
        tree = _source_tree(cls)
        if tree is None:
            continue
        seen_source = True
        for node in ast.walk(tree):
            targets = []
            if isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for target in targets:
                for item in ast.walk(target):
                    if (isinstance(item, ast.Attribute) and isinstance(item.value, ast.Name)
                            and item.value.id == "self"):
                        names.add(item.attr)
    return names if seen_source else None


def first_missing(trainer_class, modules: dict | None = None) -> str | None:
    """The first name of ``HELPERS``, ``METHODS``, ``RESULT_LENGTHS`` and ``ATTRIBUTES`` that
    ``trainer_class`` (TRL's GRPOTrainer) or TRL's modules lack, as the message writes it; None when all are
    there.
    ``modules``: module name -> module, for tests (default: imported)."""
    for module_name, names in HELPERS.items():
        try:
            module = (modules or {}).get(module_name) or importlib.import_module(module_name)
        except ImportError:
            return module_name
        for name in names:
            if not hasattr(module, name):
                return f"{module_name}.{name}"
    for name, parameters in METHODS.items():
        method = getattr(trainer_class, name, None)
        shown = f"GRPOTrainer.{name}({', '.join(parameters)})"
        if not callable(method):
            return shown
        try:
            found = list(inspect.signature(method).parameters)[1:1 + len(parameters)]
        except (TypeError, ValueError):
            continue
        if tuple(found) != parameters:
            return shown
    for name, length in RESULT_LENGTHS.items():
        lengths = _returned_lengths(getattr(trainer_class, name))
        if lengths is not None and lengths != {length}:
            return f"GRPOTrainer.{name} returning {length} values"
    attributes = _assigned_attributes(trainer_class)
    if attributes is not None:
        for name in ATTRIBUTES:
            if name not in attributes:
                return f"GRPOTrainer.{name}"
    return None


def check(trainer_class, version: str) -> None:
    """Raise the one-line ImportError if TRL ``version`` lacks a name appo needs, or is older than the lowest
    supported release; warn if it is newer than the tested range but has every name."""
    missing = first_missing(trainer_class)
    if missing is not None:
        raise _fail(version, missing)
    try:
        parsed = Version(version)
    except ValueError:
        return
    if parsed.release < _LOWEST.release:
        raise ImportError(f"appo.integrations.trl supports {SUPPORTED}; trl {version} is older (it has the "
                          "names appo uses, but tests/integrations/test_trl.py fails with it)")
    if parsed.release >= _BELOW.release:
        warnings.warn(f"appo.integrations.trl is tested with {SUPPORTED}; trl {version} has every TRL name "
                      "it uses but is untested", stacklevel=3)


try:
    from trl import GRPOConfig, GRPOTrainer
except ImportError:
    raise _fail(trl.__version__, "trl.GRPOConfig and trl.GRPOTrainer") from None
check(GRPOTrainer, trl.__version__)

# After the check, so that a missing helper fails with its message.
from trl.chat_template_utils import parse_response
from trl.data_utils import is_conversational
from trl.models.utils import disable_gradient_checkpointing
from trl.trainer.utils import split_tensor_dict

__all__ = ["GRADED", "SUPPORTED", "GRPOConfig", "GRPOSurface", "disable_gradient_checkpointing",
           "is_conversational", "parse_turn", "split_tensor_dict"]


def parse_turn(tokenizer, ids: list[int], prefix: list[int], tools) -> dict:
    """TRL's ``parse_response`` of one assistant turn (a message dict); ``tools`` types the call arguments."""
    return parse_response(tokenizer, ids, prefix=prefix, tools=tools)


_TAG = re.compile(r"</?\s*([A-Za-z_][\w.-]*)\s*/?>")
_SLOT = "APPOTOOLRESULT{}Z"  # stands for a tool message's content while the template is rendered


class GRPOSurface(GRPOTrainer):
    """``GRPOTrainer`` with its private override points routed to appo's hooks, and accessors for the private
    state appo reads. ``APPOTrainer`` implements the hooks (``_appo_prepare_inputs``, ``_appo_generated``,
    ``_appo_rewarded``); the defaults here are TRL's behaviour."""

    _appo_model_masks = None   # the batch's tool masks, from ``_generate`` to ``_calculate_rewards``

    # ------------------------------------------------------------------------------------ TRL calls these
    def _generate_and_score_completions(self, inputs):
        self._appo_model_masks = None
        return self._appo_generated(super()._generate_and_score_completions(inputs))

    def _generate(self, prompts):
        result = super()._generate(prompts)
        self._appo_model_masks = result[2]       # TRL's tool_mask (1: the model's token), None without tools
        return result

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        masks = self._appo_model_masks
        if masks is None:
            masks = [[1] * len(ids) for ids in completion_ids_list]
        rewards = self._trl_rewards(inputs, prompts, completions, completion_ids_list, masks)
        self._appo_rewarded(inputs, prompts, completions, completion_ids_list, masks, rewards)
        return rewards

    def _prepare_inputs(self, generation_batch):
        return self._appo_prepare_inputs(generation_batch)

    def _get_tool_suffix_ids(self, tool_messages):
        """The tokens after an assistant turn that called tools: the chat template's text around the tool
        messages (tokenized as TRL does) and each message's content as plain text: escaped
        (``escape_tool_output``, with the template's own tag names) and encoded by ``encode_plain``, so no
        tool output becomes a special or added token id. Each content is what the template writes for it
        (rendered alone between fixed slots), so a template that quotes or trims content keeps doing so."""
        contents = [message.get("content") for message in tool_messages]
        for message, content in zip(tool_messages, contents):
            if not isinstance(content, str):
                raise TypeError(f"tools: APPOTrainer takes tool results as text; tool "
                                 f"{message.get('name')!r} returned {type(content).__name__} content")
        call = [{"type": "function", "function": {"name": tool_messages[0]["name"], "arguments": {}}}]
        head = [{"role": "user", "content": "dummy"},
                {"role": "assistant", "content": "", "tool_calls": call}]
        slots = [_SLOT.format(i) for i in range(len(tool_messages))]

        def render(texts, generation_prompt=True, messages=tool_messages):
            rendered = [{**message, "content": text} for message, text in zip(messages, texts)]
            return self.processing_class.apply_chat_template(
                head + rendered, add_generation_prompt=generation_prompt, tokenize=False,
                chat_template=self.chat_template, **self.chat_template_kwargs)

        prefix = render([], generation_prompt=False, messages=[])
        eos = self._tokenizer.eos_token
        if eos and eos in prefix:                   # TRL's rule: the suffix starts after the turn's EOS
            prefix = prefix[:prefix.rindex(eos) + len(eos)]
        skeleton = render(slots)
        if not skeleton.startswith(prefix):
            raise ValueError("chat_template: the tool messages' rendering does not continue the assistant "
                             "turn")
        skeleton = skeleton[len(prefix):]
        pieces = re.split("|".join(slots), skeleton)
        if len(pieces) != len(slots) + 1 or [s for s in slots if skeleton.count(s) != 1]:
            raise ValueError("chat_template: it does not write each tool message's content once, in order")
        template_tags = sorted({m.group(1) for piece in pieces for m in _TAG.finditer(piece)})
        ids = self._tokenizer.encode(pieces[0], add_special_tokens=False)
        for i, content in enumerate(contents):
            escaped = escape_tool_output(content, tags=template_tags)
            real = render(slots[:i] + [escaped] + slots[i + 1:])[len(prefix):]
            at = skeleton.index(slots[i])
            before, after = skeleton[:at], skeleton[at + len(slots[i]):]
            if not (real.startswith(before) and real.endswith(after)):
                raise ValueError("chat_template: a tool message's content changes the text around it")
            ids += encode_plain(self._tokenizer, real[len(before):len(real) - len(after)])
            ids += self._tokenizer.encode(pieces[i + 1], add_special_tokens=False)
        return ids

    # ------------------------------------------------------------------------------- hooks (TRL's defaults)
    def _appo_prepare_inputs(self, generation_batch):
        return self._trl_prepare_inputs(generation_batch)

    def _appo_generated(self, output: dict) -> dict:
        return output

    def _appo_rewarded(self, inputs, prompts, completions, completion_ids, model_masks, rewards) -> None:
        return None

    # ----------------------------------------------------------------------------- TRL's pieces, for appo
    def _trl_generate_batch(self, generation_batch) -> dict:
        """TRL's generation and scoring of one generation batch
        (``GRPOTrainer._generate_and_score_completions``, through this class's override)."""
        return self._generate_and_score_completions(generation_batch)

    def _trl_prepare_inputs(self, generation_batch):
        """TRL's own buffering of a generation batch (``GRPOTrainer._prepare_inputs``)."""
        return super()._prepare_inputs(generation_batch)

    def _trl_rewards(self, inputs, prompts, completions, completion_ids, model_masks, *,
                     keep_logs: bool = True):
        """TRL's reward functions on R rows (``GRPOTrainer._calculate_rewards``), gathered over ranks:
        float32 [world * R, F] (NaN where a function returned None). Each function also receives
        ``graded_completions`` (list[str]): ``graded_text`` of each row's ids and ``model_masks`` (1 where the
        model wrote the token). ``keep_logs=False`` drops what the functions log (``log_extra`` /
        ``log_metric``)."""
        texts = [graded_text(self._tokenizer, ids, mask) for ids, mask in zip(completion_ids, model_masks)]
        rows = [{**row, GRADED: text} for row, text in zip(inputs, texts)]
        if keep_logs:
            return super()._calculate_rewards(rows, prompts, completions, completion_ids)
        saved_logs = {key: list(value) for key, value in self._pending_extra_logs.items()}
        saved_metrics = {key: list(value) for key, value in self._pending_metrics.items()}
        try:
            return super()._calculate_rewards(rows, prompts, completions, completion_ids)
        finally:
            self._pending_extra_logs.clear()
            self._pending_extra_logs.update(saved_logs)
            self._pending_metrics.clear()
            self._pending_metrics.update(saved_metrics)

    def _trl_tool_loop(self, rows: list[int], contexts: list, prompt_ids: list, completion_ids: list,
                       completions: list, rounds: int):
        """TRL's tool loop (``GRPOTrainer._tool_call_loop``) over K partial completions whose last turn calls
        tools: each runs with the tool functions of generation row ``rows[k]``, for at most ``rounds`` tool
        rounds. ``contexts``: the K message lists before that turn; ``completions``: the K message lists so
        far.
        Returns (K token-id lists, K masks (0 on the tokens the loop appended for tool results, 1 elsewhere),
        K message lists, calls made, calls failed)."""
        sync_dicts, async_dicts, limit = self._sync_tool_dicts, self._async_tool_dicts, \
            self.max_tool_calling_iterations
        self._sync_tool_dicts = [sync_dicts[row] for row in rows]
        self._async_tool_dicts = [async_dicts[row] for row in rows]
        self.max_tool_calling_iterations = rounds
        try:
            masks, completions, completion_ids, _, calls, failures, _ = super()._tool_call_loop(
                contexts, prompt_ids, completion_ids, completions, None, None, {})
        finally:
            self._sync_tool_dicts, self._async_tool_dicts = sync_dicts, async_dicts
            self.max_tool_calling_iterations = limit
        return completion_ids, masks, completions, calls, failures

    @property
    def _trl_tokenizer(self):
        """The text tokenizer (TRL's ``processing_class``, or a processor's tokenizer)."""
        return self._tokenizer

    @property
    def _trl_is_vlm(self) -> bool:
        return self._is_vlm

    @property
    def _trl_eos_ids(self) -> list[int]:
        return list(self.eos_token_ids)

    @property
    def _trl_step(self) -> int:
        """Micro-steps taken (TRL's counter of ``training_step`` calls)."""
        return self._step

    @property
    def _trl_buffer(self):
        """The buffered slices of the current generation batch (None before the first)."""
        return self._buffered_inputs

    @_trl_buffer.setter
    def _trl_buffer(self, slices) -> None:
        self._buffered_inputs = slices

    @property
    def _trl_train_metrics(self) -> dict:
        """TRL's training metrics (name -> list of values, averaged at each log)."""
        return self._metrics["train"]
