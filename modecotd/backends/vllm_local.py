"""Teacher backend ``vllm``: offline batched generation with a local vLLM engine on a CUDA GPU.

vLLM is imported only inside functions, so this module imports fine on a CPU-only node; the
engine itself is built only after :func:`check_vllm_usable` has said it can run here.

vLLM API used (offline inference): ``vllm.LLM(model=..., dtype=..., seed=...,
tensor_parallel_size=..., gpu_memory_utilization=..., max_model_len=...)``, ``LLM.get_tokenizer()``,
``LLM.llm_engine.model_config.max_model_len``, ``vllm.SamplingParams(n=..., temperature=...,
max_tokens=..., stop=[...], seed=...)`` and ``LLM.generate(prompts, params, use_tqdm=False)``,
which returns one ``RequestOutput`` per prompt in prompt order, each with ``.outputs``: a list of
``CompletionOutput`` with ``.text`` and ``.token_ids``.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

from modecotd.backends import Completion, cut_at_stop
from modecotd.errors import ModelError

# Our config's dtype names -> vLLM's; vLLM's own names pass through unchanged. Our ``auto`` is
# resolved on this node's GPU first (see VLLMGenerator), never handed to vLLM as "auto".
_DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32",
           "bfloat16": "bfloat16", "float16": "float16", "float32": "float32"}


def check_vllm_usable() -> None:
    """Raise :class:`ModelError` (one line) when vLLM cannot run on this node; return otherwise."""
    if importlib.util.find_spec("vllm") is None:
        raise ModelError("teacher.backend vllm: vLLM is not installed on this node "
                         "(pip install vllm; it needs a CUDA GPU)")
    import torch

    from modecotd.precision import default_device

    if default_device() != "cuda":
        raise ModelError("teacher.backend vllm: no CUDA GPU is reserved for this actor; use backend "
                         "transformers on CPU, or give the teacher actors GPUs (teacher.gpus_per_actor)")


def _vllm_dtype(dtype: str) -> str:
    if dtype == "auto":  # what our auto means on this node's GPU (bf16 where it is native, else fp32)
        from modecotd.precision import resolve_dtype

        dtype = resolve_dtype("auto", "cuda").dtype
    try:
        return _DTYPES[dtype]
    except KeyError:
        raise ModelError(f"teacher.backend vllm: unknown dtype {dtype!r} "
                         f"(one of {', '.join(sorted(_DTYPES))})") from None


def _engine_max_model_len(llm: Any) -> int | None:
    """The context length the engine runs with, or None when this vLLM version does not say."""
    for holder in (getattr(getattr(llm, "llm_engine", None), "model_config", None),
                   getattr(llm, "model_config", None)):
        value = getattr(holder, "max_model_len", None)
        if isinstance(value, int) and value > 0:
            return value
    return None


class VLLMGenerator:
    """A :class:`~modecotd.backends.TextGenerator` on a local vLLM engine (needs a CUDA GPU)."""

    def __init__(self, model_dir: str | Path, *, dtype: str = "bf16", seed: int = 0, tensor_parallel_size: int = 1,
                 gpu_memory_utilization: float = 0.9, max_model_len: int | None = None):
        """``dtype`` ``auto`` is resolved here, on the GPU the engine runs on (see
        :func:`modecotd.precision.resolve_dtype`); ``tensor_parallel_size`` GPUs must be visible."""
        check_vllm_usable()
        import torch
        import vllm

        visible = torch.cuda.device_count()
        if tensor_parallel_size > visible:
            raise ModelError(f"teacher.backend vllm: tensor_parallel_size {tensor_parallel_size} needs that many GPUs, "
                             f"but {visible} are visible to this actor (teacher.gpus_per_actor)")
        kwargs: dict[str, Any] = {"model": str(model_dir), "dtype": _vllm_dtype(dtype), "seed": seed,
                                  "tensor_parallel_size": tensor_parallel_size,
                                  "gpu_memory_utilization": gpu_memory_utilization,
                                  # weights from safetensors only, never a pickle (as everywhere else here)
                                  "load_format": "safetensors"}
        if max_model_len is not None:
            kwargs["max_model_len"] = max_model_len
        self.llm = vllm.LLM(**kwargs)
        self.max_model_len = max_model_len if max_model_len is not None else _engine_max_model_len(self.llm)
        self._tokenizer: Any = None

    def _prompt_tokens(self, prompt) -> int | None:
        """Tokens in ``prompt`` (text, or token ids already) as the engine counts them, or None when
        there is no tokenizer."""
        if isinstance(prompt, dict):
            return len(prompt["prompt_token_ids"])
        if self._tokenizer is None:
            try:
                self._tokenizer = self.llm.get_tokenizer()
            except Exception:  # noqa: BLE001 - no tokenizer (skip_tokenizer_init): vLLM checks itself
                return None
        return len(self._tokenizer.encode(prompt))

    def generate(self, prompts: list, *, samples: int, temperature: float, max_new_tokens: int,
                 stop: list[str], seed: int) -> list[Completion]:
        import vllm

        if prompts and not isinstance(prompts[0], str):  # chat: rendered here, sent as token ids (vLLM
            from modecotd.backends import as_texts      # would add special tokens to text once more)

            tokenizer = self.llm.get_tokenizer()
            prompts = [{"prompt_token_ids": tokenizer.encode(text, add_special_tokens=False)}
                       for text in as_texts(prompts, tokenizer)[0]]
        results: list[Completion | None] = [None] * len(prompts)
        send: list[int] = []  # indexes of the prompts that go to the engine
        limit = None if self.max_model_len is None else self.max_model_len - max_new_tokens
        for i, prompt in enumerate(prompts):
            n_tokens = None if limit is None else self._prompt_tokens(prompt)
            if n_tokens is not None and n_tokens > limit:
                results[i] = Completion(error=f"prompt is {n_tokens} tokens; the limit is {limit} "
                                              "(max_model_len - max_new_tokens)")
            else:
                send.append(i)

        if send:
            params = vllm.SamplingParams(n=samples, temperature=temperature, max_tokens=max_new_tokens,
                                         stop=list(stop), seed=seed)
            batch = [prompts[i] for i in send]
            try:
                outputs = self.llm.generate(batch, params, use_tqdm=False)
                if len(outputs) != len(batch):
                    raise RuntimeError(f"vLLM returned {len(outputs)} outputs for {len(batch)} prompts")
                for i, out in zip(send, outputs):
                    results[i] = _completion(out, stop)
            except Exception:  # noqa: BLE001 - find which prompts fail, one by one
                for i in send:
                    try:
                        (out,) = self.llm.generate([prompts[i]], params, use_tqdm=False)
                        results[i] = _completion(out, stop)
                    except Exception as exc:  # noqa: BLE001 - reported on this prompt only
                        results[i] = Completion(error=f"generation failed: {exc}")
        return [r if r is not None else Completion(error="generation failed: no output") for r in results]


def _completion(output: Any, stop: list[str]) -> Completion:
    """One vLLM RequestOutput as a Completion: its texts cut at the stop strings, tokens summed."""
    return Completion(texts=[cut_at_stop(o.text, stop) for o in output.outputs],
                      tokens=sum(len(o.token_ids) for o in output.outputs))
