"""The options of each built-in engine (a model's ``args:``), typed, and the flags they become.

One pydantic model per engine (``ENGINE_ARGS``, chosen by the model's ``engine:``): every option
is a typed field that says what it means and its unit; anything else is an unknown option. Types
are strict, as a command line needs them: ``use_cuda: "yes"`` is not a boolean, ``n_ctx: 2.5``
not an integer, ``null`` is no value at all. Options left out are not passed, and the engine's
own default applies, except for the defaults written here (they are always passed).

``check_args(engine, args)`` is the one way in: the config calls it when it loads (so ``llmux
check-config`` and ``llmux serve`` report a bad option with its key and line), and
``engine_argv`` calls it again to build the child's command line from the typed model
(``EngineArgs.flags``). Only pydantic here: importable without the ``engines`` extra.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar, Literal, get_args

from pydantic import (
    AliasChoices,
    BaseModel,
    ConfigDict,
    Field,
    JsonValue,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic.fields import FieldInfo

from llmux.engines.packaged import EngineError

__all__ = [
    "ENGINE_ARGS",
    "ArgProblem",
    "EngineArgs",
    "InvalidArgs",
    "LlamaCppArgs",
    "PiperArgs",
    "VllmArgs",
    "WhisperArgs",
    "check_args",
    "option_names",
]


@dataclass(frozen=True)
class _Expect:
    """What a value of an option must be, in words (for error messages)."""

    text: str


_NonEmpty = Annotated[str, Field(min_length=1)]
Int = Annotated[int, _Expect("an integer")]
Number = Annotated[float, _Expect("a number")]
Text = Annotated[str, Field(min_length=1), _Expect("a non-empty string")]
Flag = Annotated[bool, _Expect("true or false")]
Numbers = Annotated[list[float], Field(min_length=1), _Expect("a list of numbers")]
Texts = Annotated[list[_NonEmpty], Field(min_length=1), _Expect("a list of strings")]
JsonObject = Annotated[dict[str, JsonValue], _Expect("a mapping")]
IntOrText = Annotated[int | _NonEmpty, _Expect("an integer or a non-empty string")]


class EngineArgs(BaseModel):
    """The options of one engine. Subclasses are the engines' option tables."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    flag_style: ClassVar[Literal["snake", "kebab"]]
    """How an option's name becomes its flag: ``n_ctx`` -> ``--n_ctx`` or ``--n-ctx``."""

    @model_validator(mode="before")
    @classmethod
    def _one_name_each(cls, data: Any) -> Any:
        if isinstance(data, Mapping):
            for name in cls.model_fields:
                names = _names(cls, name)
                given = [n for n in data if n in names]
                if len(given) > 1:
                    raise ValueError(f"{' and '.join(given)} name the same option; use one name")
        return data

    @field_validator("*", mode="before")
    @classmethod
    def _no_null(cls, value: Any) -> Any:
        if value is None:
            raise ValueError("null is not a value")
        return value

    def flags(self) -> list[str]:
        """``--name value ...`` for every option that has a value, in the table's order."""
        argv: list[str] = []
        for name in type(self).model_fields:
            value = getattr(self, name)
            if value is None:
                continue
            flag = "--" + (name.replace("_", "-") if self.flag_style == "kebab" else name)
            values = value if isinstance(value, list) else [value]
            argv += [flag, *(_render(v) for v in values)]
        return argv


def _render(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return json.dumps(value)
    if isinstance(value, float):
        return repr(value)
    return str(value)


class LlamaCppArgs(EngineArgs):
    """``llama-cpp``: llama_cpp.server's own flags (``llama_cpp/server/settings.py``), passed as
    ``--name value``; lists take several values, booleans true/false. Left out: the server's
    default."""

    flag_style = "snake"

    model_alias: Text | None = None
    """The model name the child reports (default: the model's path)."""
    n_gpu_layers: Int | None = None
    """Layers offloaded to the GPU, the rest run on the CPU; -1 = all (default 0)."""
    split_mode: Int | None = None
    """How layers are split across several GPUs (llama.cpp's split mode number)."""
    main_gpu: Int | None = None
    """Index of the main GPU: the whole model's when it is not split, else the one that holds
    the small tensors and intermediate results."""
    tensor_split: Numbers | None = None
    """Share of the layers per GPU, in proportion (e.g. ``[3, 1]``)."""
    use_mmap: Flag | None = None
    """Map the model file into memory instead of reading it (default true)."""
    use_mlock: Flag | None = None
    """Lock the model's memory so it is never swapped out."""
    kv_overrides: Texts | None = None
    """Model metadata overrides, each ``key=type:value`` (type bool, int or float)."""
    seed: Int | None = None
    """Random seed; -1 = random."""
    n_ctx: Int = 2048
    """Context size, in tokens (the prompt and the answer together). Always passed: 2048."""
    n_batch: Int | None = None
    """Prompt tokens evaluated per call, at most (default 512)."""
    n_ubatch: Int | None = None
    """Physical batch size, in tokens (default 512)."""
    n_threads: Int | None = Field(None, validation_alias=AliasChoices("n_threads", "threads"))
    """CPU threads for generating, one token at a time; -1 = all cores. Also ``threads``."""
    n_threads_batch: Int | None = None
    """CPU threads for prompt evaluation (batches); -1 = all cores."""
    rope_scaling_type: Int | None = None
    """RoPE scaling type (llama.cpp's number; -1 = the model's)."""
    rope_freq_base: Number | None = None
    """RoPE base frequency; 0 = the model's."""
    rope_freq_scale: Number | None = None
    """RoPE frequency scaling factor; 0 = the model's."""
    flash_attn: Flag | None = None
    """Use flash attention."""
    offload_kqv: Flag | None = None
    """Keep the KV cache on the GPU (default true)."""
    embedding: Flag | None = None
    """Serve embeddings (``/v1/embeddings``)."""
    logits_all: Flag | None = None
    """Return the logits of every token, not only the last one's (default true)."""
    last_n_tokens_size: Int | None = None
    """Tokens looked back at for the repeat penalty (default 64)."""
    lora_base: Text | None = None
    """Path of the base model a LoRA applies to (e.g. an f16 one under a quantized model)."""
    lora_path: Text | None = None
    """Path of a LoRA adapter file."""
    chat_format: Text | None = None
    """Chat template by name (``chatml``, ``llama-2``, ...); default: the model's own."""
    chat_template_kwargs: JsonObject | None = None
    """Extra values for the chat template, passed as one JSON object."""
    clip_model_path: Text | None = None
    """Path of a CLIP model, for chat with images."""
    cache: Flag | None = None
    """Cache evaluated prompts to answer repeated prefixes sooner."""
    cache_type: Annotated[Literal["ram", "disk"], _Expect("ram or disk")] | None = None
    """Where that cache lives: ``ram`` or ``disk`` (default ram)."""
    cache_size: Int | None = None
    """Size of that cache, in bytes (default 2 GiB)."""
    type_k: Int | None = None
    """Quantization of the KV cache's keys (ggml type number)."""
    type_v: Int | None = None
    """Quantization of the KV cache's values (ggml type number)."""
    draft_model: Text | None = None
    """Speculative decoding: ``prompt-lookup-decoding``."""
    draft_model_num_pred_tokens: Int | None = None
    """Speculative decoding: tokens predicted per step (default 10)."""
    verbose: Flag | None = None
    """Print llama.cpp's debug output to the model's log (default true)."""
    interrupt_requests: Flag = False
    """Abort a running completion when another request arrives. Always passed: false (its
    default, true, is wrong behind a gateway that serves several clients: requests queue)."""
    disable_ping_events: Flag | None = None
    """Send no SSE ping events while streaming."""


class WhisperArgs(EngineArgs):
    """``faster-whisper``: ``python -m llmux.engines.whisper``'s flags (``--kebab-case``)."""

    flag_style = "kebab"

    device: Annotated[Literal["cpu", "cuda", "auto"], _Expect("cpu, cuda or auto")] = "cpu"
    """Where the model runs: ``cpu``, ``cuda`` or ``auto``. Always passed: cpu."""
    device_index: Int | None = None
    """Which GPU, with ``device: cuda`` (default 0)."""
    compute_type: Text = "int8"
    """CTranslate2 compute type: ``int8``, ``float16``, ``int8_float16``, ``float32``, ...
    Always passed: int8."""
    threads: Int = 2
    """CPU threads. Always passed: 2."""
    beam_size: Int | None = None
    """Beam search width while decoding (default 5; 1 = greedy, fastest)."""


class PiperArgs(EngineArgs):
    """``piper``: ``python -m llmux.engines.piper``'s flags (``--kebab-case``)."""

    flag_style = "kebab"

    config: Text | None = None
    """Path of the voice's ``.onnx.json``; default: the one next to the ``.onnx``."""
    speaker: IntOrText | None = None
    """Default speaker of a multi-speaker voice: its number or its name."""
    use_cuda: Flag | None = None
    """Run the voice on the GPU (onnxruntime's CUDA provider; default false)."""
    max_input_chars: Annotated[int, Field(ge=1), _Expect("an integer of at least 1")] | None = None
    """Longest ``input`` of a speech request, in characters; past it 400 (default 4096)."""


class _BadWord(ValueError):
    """An ``extra_args`` item that cannot go on the command line; its text is the problem."""


_SHELL_CHARS = frozenset(";|&$`<>")
_FLAG = re.compile(r"--?[A-Za-z0-9][A-Za-z0-9_.-]*")
_NUMBER = re.compile(r"-\d[\d.eE+-]*")
_SET_BY_LLMUX = {
    "host": "llmux sets it (the child listens on 127.0.0.1)",
    "port": "llmux sets it (a free port)",
    "model": "it is the model's 'model:'",
    "uds": "llmux talks to the child over TCP",
    "api-key": "llmux's own calls to the child carry no key (use server.api_keys)",
    "ssl-keyfile": "llmux talks plain HTTP to its children on 127.0.0.1",
    "ssl-certfile": "llmux talks plain HTTP to its children on 127.0.0.1",
    "help": "it prints the help and exits",
    "h": "it prints the help and exits",
}


def _check_word(index: int, word: str, typed: set[str]) -> None:
    """One ``extra_args`` item: a flag (``--name``, ``--name=value``, ``-x``) or a value."""
    where = f"item {index + 1} ({word!r})"
    if not word:
        raise _BadWord(f"{where}: empty")
    if any(ord(c) < 32 or ord(c) == 127 for c in word):
        raise _BadWord(f"{where}: control characters")
    if _SHELL_CHARS & set(word):
        raise _BadWord(
            f"{where}: {' '.join(sorted(_SHELL_CHARS & set(word)))} mean something to a shell, "
            "but these words go to vLLM's command line as they are, never through a shell"
        )
    if not word.startswith("-") or _NUMBER.fullmatch(word):
        return
    flag, _, _ = word.partition("=")
    if not _FLAG.fullmatch(flag):
        hint = " (one word per item: the flag and its value as two items)" if " " in flag else ""
        raise _BadWord(f"{where}: not a flag like --name or --name=value{hint}")
    name = flag.lstrip("-").replace("_", "-")
    if name in _SET_BY_LLMUX:
        raise _BadWord(f"{where}: {flag} cannot be given: {_SET_BY_LLMUX[name]}")
    if name in typed:
        raise _BadWord(
            f"{where}: {flag} is an option of its own: use args.{name.replace('-', '_')}"
        )


class VllmArgs(EngineArgs):
    """``vllm``: vLLM's own OpenAI server's flags (``vllm/engine/arg_utils.py``,
    ``vllm/entrypoints/openai/cli_args.py``), ``--kebab-case``. A true flag is passed bare
    (``--enforce-eager``), a false one not at all (vLLM's default for each is false). Anything
    else vLLM takes goes in ``extra_args``."""

    flag_style = "kebab"

    enable_sleep_mode: Flag = True
    """Serve sleep mode (``--enable-sleep-mode``; its endpoints need ``VLLM_SERVER_DEV_MODE=1``,
    which llmux sets). Always passed: true; false only where the platform has no sleep mode
    (it then takes no ``sleep:``)."""
    gpu_memory_utilization: (
        Annotated[float, Field(gt=0, le=1), _Expect("a number above 0, at most 1")] | None
    ) = None
    """Share of the GPU's memory vLLM may take for weights, activations and KV cache (vLLM's
    default 0.9). Set it so that ``vram_gb`` covers it: vLLM takes this share of the whole GPU,
    whatever else is on it."""
    max_model_len: Annotated[int, Field(ge=1), _Expect("an integer of at least 1")] | None = None
    """Context length, in tokens (default: the model's own; a smaller one needs less KV cache)."""
    tensor_parallel_size: (
        Annotated[int, Field(ge=1), _Expect("an integer of at least 1")] | None
    ) = None
    """GPUs the model is split across (default 1); with several, give the model ``gpus:``."""
    dtype: (
        Annotated[
            Literal["auto", "half", "float16", "bfloat16", "float", "float32"],
            _Expect("auto, half, float16, bfloat16, float or float32"),
        ]
        | None
    ) = None
    """Data type of the weights and activations (default auto: the model's own)."""
    quantization: Text | None = None
    """Quantization method of the weights (``awq``, ``gptq``, ``fp8``, ...; default: read
    from the model's config)."""
    kv_cache_dtype: Text | None = None
    """Data type of the KV cache (``auto``, ``fp8``, ...; default auto)."""
    max_num_seqs: Annotated[int, Field(ge=1), _Expect("an integer of at least 1")] | None = None
    """Most sequences in one batch."""
    served_model_name: (
        Annotated[
            _NonEmpty | Annotated[list[_NonEmpty], Field(min_length=1)],
            _Expect("a string or a list of strings"),
        ]
        | None
    ) = None
    """The names the child answers to (vLLM refuses any other ``model`` with a 404). Default:
    llmux's id of the model and its aliases (or ``upstream_model``), the names requests carry."""
    enforce_eager: Flag | None = None
    """Run the model in eager mode, without CUDA graphs (less memory, slower)."""
    trust_remote_code: Flag | None = None
    """Run code that ships with the model on the Hub (some architectures need it)."""
    tokenizer: Text | None = None
    """Tokenizer name or path (default: the model's)."""
    chat_template: Text | None = None
    """Path of a chat template (Jinja), or the template itself (default: the model's)."""
    seed: Int | None = None
    """Random seed."""
    extra_args: (
        Annotated[list[str], _Expect("a list of command-line words (flags and values)")] | None
    ) = None
    """More of vLLM's flags, each word an item (``["--max-num-batched-tokens", "8192"]``),
    passed after the others as they are (never through a shell). Refused: shell
    metacharacters, a flag and its value in one item, the flags llmux sets itself (``--host``,
    ``--port``, ``--model``, ``--api-key``, ...) and the options above (use them by name)."""

    @field_validator("extra_args")
    @classmethod
    def _plain_words(cls, words: list[str] | None) -> list[str] | None:
        typed = {n.replace("_", "-") for n in cls.model_fields if n != "extra_args"}
        for index, word in enumerate(words or ()):
            _check_word(index, word, typed)
        return words

    def flags(self) -> list[str]:
        argv: list[str] = []
        for name in type(self).model_fields:
            value = getattr(self, name)
            if value is None or value is False or name == "extra_args":
                continue
            flag = "--" + name.replace("_", "-")
            if value is True:
                argv.append(flag)
            else:
                argv += [
                    flag,
                    *(_render(v) for v in (value if isinstance(value, list) else [value])),
                ]
        return argv + list(self.extra_args or ())


ENGINE_ARGS: dict[str, type[EngineArgs]] = {
    "llama-cpp": LlamaCppArgs,
    "faster-whisper": WhisperArgs,
    "piper": PiperArgs,
    "vllm": VllmArgs,
}
"""The options model of each built-in engine."""


def _names(cls: type[EngineArgs], name: str) -> list[str]:
    """The names an option may be given by: its own, then its aliases."""
    alias = cls.model_fields[name].validation_alias
    if isinstance(alias, AliasChoices):
        return [str(choice) for choice in alias.choices]
    return [name]


def option_names(engine: str) -> list[str]:
    """Every name ``engine`` takes in ``args``, aliases included, sorted."""
    cls = ENGINE_ARGS[engine]
    return sorted(n for name in cls.model_fields for n in _names(cls, name))


def _expected(field: FieldInfo) -> str:
    for meta in field.metadata:
        if isinstance(meta, _Expect):
            return meta.text
    for member in get_args(field.annotation):
        for meta in getattr(member, "__metadata__", ()):
            if isinstance(meta, _Expect):
                return meta.text
    return "something else"  # every field above has an _Expect


@dataclass(frozen=True)
class ArgProblem:
    """One bad option: ``key`` as it was written (None: the options as a whole)."""

    key: str | None
    message: str
    """For a config error, after the key: ``unknown option; allowed: ...``,
    ``must be an integer, not 'big'``."""
    unknown: bool = False


class InvalidArgs(EngineError):
    """``args`` that ``engine`` does not take; ``problems`` lists each bad key."""

    def __init__(self, engine: str, problems: list[ArgProblem]) -> None:
        self.engine = engine
        self.problems = problems
        super().__init__("; ".join(self._sentence(p) for p in problems))

    def _sentence(self, problem: ArgProblem) -> str:
        if problem.key is None:
            return f"engine {self.engine!r}: args: {problem.message}"
        if problem.unknown:
            allowed = ", ".join(option_names(self.engine))
            return f"engine {self.engine!r} has no option args.{problem.key}; allowed: {allowed}"
        return f"engine {self.engine!r}: args.{problem.key} {problem.message}"


def _problems(
    cls: type[EngineArgs], args: Mapping[str, Any], exc: ValidationError
) -> list[ArgProblem]:
    fields = {n: f for name, f in cls.model_fields.items() for n in _names(cls, name)}
    allowed = ", ".join(sorted(fields))
    out: dict[str | None, ArgProblem] = {}
    for err in exc.errors():
        key = str(err["loc"][0]) if err["loc"] else None
        if key in out:
            continue  # a union reports each of its branches; one line per key
        if key is None:
            out[key] = ArgProblem(None, err["msg"].removeprefix("Value error, "))
        elif err["type"] == "extra_forbidden" or key not in fields:
            out[key] = ArgProblem(key, f"unknown option; allowed: {allowed}", unknown=True)
        elif isinstance(err.get("ctx", {}).get("error"), _BadWord):
            out[key] = ArgProblem(key, str(err["ctx"]["error"]))
        else:
            out[key] = ArgProblem(key, f"must be {_expected(fields[key])}, not {args[key]!r}")
    order = {key: i for i, key in enumerate(args)}
    return sorted(out.values(), key=lambda p: -1 if p.key is None else order.get(p.key, 0))


def check_args(engine: str, args: Mapping[str, Any]) -> EngineArgs:
    """The typed options of ``engine`` (a built-in engine) from a config's ``args``.

    Raises ``InvalidArgs`` (an ``EngineError``) naming every unknown or ill-typed option."""
    cls = ENGINE_ARGS[engine]
    try:
        return cls.model_validate(args)
    except ValidationError as exc:
        raise InvalidArgs(engine, _problems(cls, args, exc)) from None
