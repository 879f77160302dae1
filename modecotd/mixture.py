"""Stage 3 as a library: the LoraHub-style mixer and its gradient-free weight search.

The mixer holds the frozen student with one LoRA slot shaped like the experts. Setting weights
``w`` writes ``A = sum_i w_i A_i`` and ``B = sum_i w_i B_i`` into that slot (the paper's way,
which is not ``sum_i w_i B_i A_i``). The objective is the mean cross-entropy over few-shot
examples plus ``l1 * mean |w|``; :func:`search_weights` minimises it with Nevergrad's NGOpt.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from modecotd.distill import collate, token_losses, tokenize_rows
from modecotd.models import is_encoder_decoder
from modecotd.tasks.schema import AnswerKind

ADAPTER_NAME = "default"


def read_adapter(folder: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """An expert's adapter config and its LoRA tensors (peft's saved key names)."""
    from peft.utils import load_peft_weights

    config = json.loads((Path(folder) / "adapter_config.json").read_text())
    return config, {k: v.float() for k, v in load_peft_weights(str(folder), device="cpu").items()}


def check_compatible(configs: dict[str, dict]) -> None:
    """All experts must share rank, alpha and target modules to be mixed."""
    keys = ("r", "lora_alpha", "target_modules")
    first_name, first = next(iter(configs.items()))
    for name, config in configs.items():
        for key in keys:
            a, b = first.get(key), config.get(key)
            if isinstance(a, list) or isinstance(b, list):
                a, b = sorted(a or []), sorted(b or [])
            if a != b:
                raise ValueError(f"experts {first_name!r} and {name!r} differ in {key}: {a} vs {b}")


class LoraHubMixer:
    """The student plus a LoRA slot whose A and B are weighted sums of the experts' A and B."""

    def __init__(self, student_dir: Path, expert_dirs: dict[str, Path], dtype: str = "fp32"):
        from peft import PeftModel

        from modecotd.models import load_lm, load_tokenizer

        if not expert_dirs:
            raise ValueError("a mixture needs at least one expert")
        self.names = list(expert_dirs)
        loaded = {name: read_adapter(path) for name, path in expert_dirs.items()}
        check_compatible({name: cfg for name, (cfg, _) in loaded.items()})
        self.tokenizer = load_tokenizer(student_dir, padding_side="right")
        base = load_lm(student_dir, dtype)
        self.model = PeftModel.from_pretrained(base, str(expert_dirs[self.names[0]]), adapter_name=ADAPTER_NAME)
        self.model.eval()
        self.slots = self._slots()
        # Stack each slot's expert tensors once: [n_experts, *shape], in the slot's dtype.
        self.stacks: dict[str, torch.Tensor] = {}
        for slot_name, param in self.slots.items():
            saved = self._saved_key(slot_name)
            missing = [n for n in self.names if saved not in loaded[n][1]]
            if missing:
                raise ValueError(f"experts {missing} have no tensor {saved}")
            self.stacks[slot_name] = torch.stack([loaded[n][1][saved] for n in self.names]).to(param.dtype)

    def _slots(self) -> dict[str, torch.nn.Parameter]:
        return {n: p for n, p in self.model.named_parameters()
                if ("lora_A" in n or "lora_B" in n) and f".{ADAPTER_NAME}." in n}

    @staticmethod
    def _saved_key(param_name: str) -> str:
        return param_name.replace(f".{ADAPTER_NAME}.", ".")

    @torch.no_grad()
    def set_weights(self, weights) -> None:
        """Write the weighted sums of A and of B into the LoRA slot."""
        w = torch.as_tensor(list(weights), dtype=torch.float32)
        if w.numel() != len(self.names):
            raise ValueError(f"expected {len(self.names)} weights, got {w.numel()}")
        for slot_name, param in self.slots.items():
            stack = self.stacks[slot_name]
            param.copy_(torch.tensordot(w.to(stack.dtype), stack, dims=1))

    @torch.no_grad()
    def few_shot_loss(self, batch: dict[str, torch.Tensor]) -> float:
        """Mean over examples of each example's mean token cross-entropy on its target."""
        losses, mask = token_losses(self.model, batch)
        return float(((losses * mask).sum(1) / mask.sum(1).clamp(min=1)).mean())

    def batch_for(self, rows: list[dict], kind: AnswerKind, max_length: int) -> dict[str, torch.Tensor]:
        examples, _ = tokenize_rows(rows, kind, self.tokenizer, max_length, is_encoder_decoder(self.model))
        if not examples:
            raise ValueError("no few-shot example fits in max_length")
        return collate(examples, self.tokenizer.pad_token_id)


@dataclass
class SearchResult:
    weights: list[float]
    objective: float
    history: list[dict]


def search_weights(objective: Callable[[list[float]], float], n: int, *, budget: int, bound: float,
                   seed: int, l1: float) -> SearchResult:
    """Minimise ``objective(w) + l1 * mean|w|`` over ``[-bound, bound]^n`` with NGOpt, from w = 0."""
    import warnings

    import nevergrad as ng
    import numpy as np

    # NGOpt's sub-optimisers (COBYLA) warn about settings they adjust themselves; not the user's concern.
    warnings.filterwarnings("ignore", message="COBYLA", category=UserWarning)

    parametrization = ng.p.Array(init=np.zeros(n), lower=-bound, upper=bound)
    parametrization.random_state = np.random.RandomState(seed)
    optimizer = ng.optimizers.NGOpt(parametrization=parametrization, budget=budget)
    history: list[dict] = []
    best: tuple[float, list[float]] | None = None
    for evaluation in range(budget):
        candidate = optimizer.ask()
        weights = [float(x) for x in candidate.value]
        loss = objective(weights)
        value = loss + l1 * float(np.mean(np.abs(weights)))
        optimizer.tell(candidate, value)
        history.append({"evaluation": evaluation, "loss": loss, "objective": value, "weights": weights})
        if best is None or value < best[0]:
            best = (value, weights)
    assert best is not None
    return SearchResult(weights=best[1], objective=best[0], history=history)
