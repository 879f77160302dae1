"""Teacher backend vllm, without vLLM or a GPU: the usability check, and the generator on a fake vllm."""
from __future__ import annotations

import importlib
import importlib.util
import subprocess
import sys
import types
from types import SimpleNamespace

import pytest
import torch

from modecotd.backends import Completion
from modecotd.backends import vllm_local
from modecotd.backends.vllm_local import VLLMGenerator, check_vllm_usable
from modecotd.errors import ModelError

_real_find_spec = importlib.util.find_spec


def _pretend_vllm_installed(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a, **k: object() if name == "vllm" else _real_find_spec(name, *a, **k))


# --- the usability check -------------------------------------------------------------------------

def test_check_says_not_installed_here(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a, **k: None if name == "vllm" else _real_find_spec(name, *a, **k))
    with pytest.raises(ModelError) as info:
        check_vllm_usable()
    assert str(info.value) == ("teacher.backend vllm: vLLM is not installed on this node "
                               "(pip install vllm; it needs a CUDA GPU)")


def test_check_on_this_machine_raises_not_installed():
    if _real_find_spec("vllm") is not None:
        pytest.skip("vLLM is installed here")
    with pytest.raises(ModelError, match="vLLM is not installed on this node"):
        check_vllm_usable()


def test_check_says_no_gpu_when_vllm_installed(monkeypatch):
    _pretend_vllm_installed(monkeypatch)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ModelError) as info:
        check_vllm_usable()
    message = str(info.value)
    assert message.startswith("teacher.backend vllm: no CUDA GPU is reserved for this actor")
    assert "teacher.gpus_per_actor" in message and "transformers" in message
    assert "\n" not in message


def test_check_passes_with_vllm_and_gpu(monkeypatch):
    _pretend_vllm_installed(monkeypatch)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    check_vllm_usable()


def test_generator_refuses_without_vllm_before_importing_it(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a, **k: None if name == "vllm" else _real_find_spec(name, *a, **k))
    with pytest.raises(ModelError, match="not installed"):
        VLLMGenerator("/nowhere")


def test_module_import_does_not_import_vllm():
    code = ("import sys, modecotd.backends.vllm_local as m; "
            "assert 'vllm' not in sys.modules, 'vllm imported'; print('ok')")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"


def test_module_imported_in_process_without_vllm():
    assert vllm_local.VLLMGenerator is VLLMGenerator
    assert "vllm" not in sys.modules  # the module above was imported at the top of this file


# --- the generator on a fake vllm ----------------------------------------------------------------

class FakeTokenizer:
    """One token per whitespace-separated word."""

    def encode(self, text):
        return list(range(len(text.split())))


class FakeLLM:
    instances: list = []

    def __init__(self, **kwargs):
        self.kwargs = kwargs
        self.calls: list[tuple[list[str], object]] = []
        self.fail_on: set[str] = set()  # prompts that make any generate call containing them raise
        self.llm_engine = SimpleNamespace(model_config=SimpleNamespace(max_model_len=kwargs.get("max_model_len", 64)))
        FakeLLM.instances.append(self)

    def get_tokenizer(self):
        return FakeTokenizer()

    def generate(self, prompts, sampling_params, use_tqdm=True):
        assert use_tqdm is False
        self.calls.append((list(prompts), sampling_params))
        bad = [p for p in prompts if p in self.fail_on]
        if bad:
            raise RuntimeError(f"engine choked on {bad[0]!r}")
        outs = []
        for p in prompts:
            completions = [SimpleNamespace(text=f"{p}|{k} END trailing", token_ids=list(range(k + 2)))
                           for k in range(sampling_params.kwargs["n"])]
            outs.append(SimpleNamespace(prompt=p, outputs=completions))
        return outs


class FakeSamplingParams:
    def __init__(self, **kwargs):
        self.kwargs = kwargs


@pytest.fixture
def fake_vllm(monkeypatch):
    fake = types.ModuleType("vllm")
    fake.LLM = FakeLLM
    fake.SamplingParams = FakeSamplingParams
    FakeLLM.instances = []
    monkeypatch.setitem(sys.modules, "vllm", fake)
    _pretend_vllm_installed(monkeypatch)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a, **k: "Fake GPU")
    return fake


def _gen(gen, prompts, **over):
    kw = dict(samples=2, temperature=0.7, max_new_tokens=8, stop=["END"], seed=5)
    kw.update(over)
    return gen.generate(prompts, **kw)


@pytest.mark.parametrize(("ours", "theirs"), [("bf16", "bfloat16"), ("fp32", "float32")])
def test_engine_arguments_and_dtype_mapping(fake_vllm, tmp_path, ours, theirs):
    VLLMGenerator(tmp_path, dtype=ours, seed=3, tensor_parallel_size=2, gpu_memory_utilization=0.5,
                  max_model_len=128)
    (llm,) = FakeLLM.instances
    assert llm.kwargs == {"model": str(tmp_path), "dtype": theirs, "seed": 3, "tensor_parallel_size": 2,
                          "gpu_memory_utilization": 0.5, "load_format": "safetensors", "max_model_len": 128}


def test_engine_defaults_leave_max_model_len_to_vllm(fake_vllm):
    gen = VLLMGenerator("/models/t")
    (llm,) = FakeLLM.instances
    assert llm.kwargs == {"model": "/models/t", "dtype": "bfloat16", "seed": 0, "tensor_parallel_size": 1,
                          "gpu_memory_utilization": 0.9, "load_format": "safetensors"}
    assert gen.max_model_len == 64  # read back from the engine's model config


@pytest.mark.parametrize(("bf16_on_gpu", "theirs"), [(True, "bfloat16"), (False, "float32")])
def test_auto_dtype_is_resolved_on_the_gpu_not_passed_to_vllm(fake_vllm, monkeypatch, bf16_on_gpu, theirs):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16_on_gpu)
    VLLMGenerator("/models/t", dtype="auto")
    (llm,) = FakeLLM.instances
    assert llm.kwargs["dtype"] == theirs


def test_more_tensor_parallel_ranks_than_visible_gpus_is_a_model_error(fake_vllm):
    with pytest.raises(ModelError, match="tensor_parallel_size 4 needs that many GPUs, but 2 are visible"):
        VLLMGenerator("/models/t", tensor_parallel_size=4)
    assert FakeLLM.instances == []


def test_make_backend_passes_the_vllm_section_to_the_engine(fake_vllm, tmp_path):
    from modecotd.config import TeacherConfig
    from modecotd.teacher import make_backend

    config = TeacherConfig(backend="vllm", gpus_per_actor=2,
                           vllm={"gpu_memory_utilization": 0.6, "max_model_len": 2048})
    teacher = make_backend(config, tmp_path)
    (llm,) = FakeLLM.instances
    assert teacher.generator.llm is llm
    assert llm.kwargs == {"model": str(tmp_path), "dtype": "bfloat16", "seed": 0,  # teacher dtype auto, bf16 GPU
                          "tensor_parallel_size": 2,  # from gpus_per_actor
                          "gpu_memory_utilization": 0.6, "load_format": "safetensors", "max_model_len": 2048}


def test_make_backend_without_a_vllm_section_uses_the_defaults(fake_vllm, tmp_path):
    from modecotd.config import TeacherConfig
    from modecotd.teacher import make_backend

    make_backend(TeacherConfig(backend="vllm", gpus_per_actor=1, dtype="fp32"), tmp_path)
    (llm,) = FakeLLM.instances
    assert llm.kwargs == {"model": str(tmp_path), "dtype": "float32", "seed": 0, "tensor_parallel_size": 1,
                          "gpu_memory_utilization": 0.9, "load_format": "safetensors"}


def test_unknown_dtype_is_a_model_error(fake_vllm):
    with pytest.raises(ModelError, match="unknown dtype 'int3'"):
        VLLMGenerator("/models/t", dtype="int3")


def test_generate_one_batch_in_order_with_stop_cut_and_tokens(fake_vllm):
    gen = VLLMGenerator("/models/t")
    out = _gen(gen, ["first q", "second q", "third q"])
    llm = FakeLLM.instances[0]
    assert len(llm.calls) == 1  # one call for the whole list; vLLM batches
    sent, params = llm.calls[0]
    assert sent == ["first q", "second q", "third q"]
    assert params.kwargs == {"n": 2, "temperature": 0.7, "max_tokens": 8, "stop": ["END"], "seed": 5}
    assert out == [Completion(texts=[f"{p}|0 ", f"{p}|1 "], tokens=2 + 3)
                   for p in ["first q", "second q", "third q"]]


def test_generate_empty_list_calls_nothing(fake_vllm):
    gen = VLLMGenerator("/models/t")
    assert _gen(gen, []) == []
    assert FakeLLM.instances[0].calls == []


def test_over_long_prompts_are_errors_and_not_sent(fake_vllm):
    gen = VLLMGenerator("/models/t", max_model_len=12)
    long_prompt = " ".join(["w"] * 5)  # 5 tokens > 12 - 8
    edge_prompt = " ".join(["w"] * 4)  # exactly the limit: sent
    out = _gen(gen, ["short", long_prompt, edge_prompt], samples=1)
    llm = FakeLLM.instances[0]
    assert [sent for sent, _ in llm.calls] == [["short", edge_prompt]]
    assert out[0].texts == ["short|0 "] and out[0].error is None
    assert out[1] == Completion(error="prompt is 5 tokens; the limit is 4 (max_model_len - max_new_tokens)")
    assert out[2].texts == [f"{edge_prompt}|0 "] and out[2].error is None


def test_all_prompts_too_long_sends_nothing(fake_vllm):
    gen = VLLMGenerator("/models/t", max_model_len=8)
    out = _gen(gen, ["a b", "c"], max_new_tokens=8)
    assert FakeLLM.instances[0].calls == []
    assert [c.error for c in out] == ["prompt is 2 tokens; the limit is 0 (max_model_len - max_new_tokens)",
                                      "prompt is 1 tokens; the limit is 0 (max_model_len - max_new_tokens)"]


def test_no_length_check_when_engine_does_not_say(fake_vllm):
    gen = VLLMGenerator("/models/t")
    gen.max_model_len = None  # an engine whose model config has no max_model_len
    out = _gen(gen, [" ".join(["w"] * 500)], samples=1)
    assert out[0].error is None and len(out[0].texts) == 1


def test_batch_failure_is_isolated_to_the_failing_prompt(fake_vllm):
    gen = VLLMGenerator("/models/t")
    llm = FakeLLM.instances[0]
    llm.fail_on = {"bad"}
    out = _gen(gen, ["good one", "bad", "good two"], samples=1)
    assert [sent for sent, _ in llm.calls] == [["good one", "bad", "good two"], ["good one"], ["bad"], ["good two"]]
    assert out[0] == Completion(texts=["good one|0 "], tokens=2)
    assert out[1] == Completion(error="generation failed: engine choked on 'bad'")
    assert out[2] == Completion(texts=["good two|0 "], tokens=2)


def test_chat_turns_are_rendered_with_the_engines_template_and_sent_as_token_ids(fake_vllm, monkeypatch):
    """vLLM would add special tokens to a text prompt once more: a rendered chat prompt goes as ids."""
    class ChatTokenizer(FakeTokenizer):
        def apply_chat_template(self, messages, tokenize, add_generation_prompt):
            assert tokenize is False and add_generation_prompt is True
            return " ".join(f"<{m['role']}> {m['content']}" for m in messages) + " <assistant>"

        def encode(self, text, add_special_tokens=True):
            assert add_special_tokens is False
            return super().encode(text)

    class ChatLLM(FakeLLM):
        def get_tokenizer(self):
            return ChatTokenizer()

        def generate(self, prompts, sampling_params, use_tqdm=True):
            self.calls.append((list(prompts), sampling_params))
            return [SimpleNamespace(prompt=p, outputs=[SimpleNamespace(text="five END", token_ids=[1, 2])])
                    for p in prompts]

    fake_vllm.LLM = ChatLLM
    from modecotd.backends.vllm_local import VLLMGenerator

    gen = VLLMGenerator("/models/m", dtype="bf16", max_model_len=64)
    [out] = _gen(gen, [[{"role": "user", "content": "2 + 3?"}]], samples=1)
    assert out.texts == ["five "]
    [(sent, _)] = gen.llm.calls
    assert sent == [{"prompt_token_ids": list(range(len("<user> 2 + 3? <assistant>".split())))}]
