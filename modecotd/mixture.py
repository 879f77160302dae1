"""Stage 3 as a library: mixtures of LoRA experts on the frozen student.

Every linear layer the experts adapt is wrapped in a :class:`MixedLinear` that keeps the frozen
layer and all experts' A and B matrices, and adds a mixed low-rank update to its output:

- ``lorahub`` (the paper's): ``(sum_i w_i B_i)(sum_i w_i A_i) x * scale``, A and B summed with the
  weights separately (cross terms included);
- ``delta``: the exact weighted sum of the experts' updates, ``sum_i w_i scale_i B_i A_i x``;
- ``gate``: ``delta`` with per-token weights from a learned router per layer (softmax over the
  experts of a linear map of the layer's input), trained with experts and student frozen.

Weights are set in place (no copy of the model) and may differ per row of a batch, so that many
candidate weight vectors are evaluated in one batched forward; they may also carry gradients.
All-zero weights leave the student exactly as it is. :func:`export_adapter` writes a mixture as
one standard peft LoRA adapter (lorahub: rank r; delta: the experts' ranks stacked).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F

from modecotd.config import AutoSize
from modecotd.distill import collate, tokenize_rows
from modecotd.losses import token_losses
from modecotd.models import is_encoder_decoder
from modecotd.tasks.schema import AnswerKind

METHODS = ("lorahub", "delta", "gate")
# Rows in one forward of candidate_losses (few-shot rows x candidates): more on a GPU, where a
# forward of a few rows leaves it idle; the logits of this many rows must fit its memory.
ROWS_PER_FORWARD = AutoSize(cpu=32, gpu=128)
PEFT_PREFIX = "base_model.model."


def read_adapter(folder: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """An expert's adapter config and its LoRA tensors (peft's saved key names), from its
    safetensors file only (never a pickled ``adapter_model.bin``)."""
    from safetensors.torch import load_file

    from modecotd.models import require_safetensors

    require_safetensors(Path(folder), "adapter_model.safetensors")
    config = json.loads((Path(folder) / "adapter_config.json").read_text())
    return config, {k: v.float() for k, v in load_file(str(Path(folder) / "adapter_model.safetensors")).items()}


def lora_scale(config: dict) -> float:
    r = config["r"]
    return config["lora_alpha"] / (r ** 0.5 if config.get("use_rslora") else r)


def check_compatible(configs: dict[str, dict], method: str) -> None:
    """Experts must adapt the same modules with the same rank to be mixed; ``lorahub``, which sums
    A and B separately, also needs one alpha."""
    keys = ("r", "target_modules") + (("lora_alpha",) if method == "lorahub" else ())
    first_name, first = next(iter(configs.items()))
    for name, config in configs.items():
        for key in keys:
            a, b = first.get(key), config.get(key)
            if isinstance(a, list) or isinstance(b, list):
                a, b = sorted(a or []), sorted(b or [])
            if a != b:
                raise ValueError(f"experts {first_name!r} and {name!r} differ in {key}: {a} vs {b}")


def check_same_base(tensors: dict[str, dict[str, torch.Tensor]]) -> None:
    """Experts to be mixed must have been trained on one base model: the same LoRA tensors, of the
    same shapes (another model's layers have other sizes or names)."""
    first_name, first = next(iter(tensors.items()))
    for name, mine in tensors.items():
        if set(mine) != set(first):
            raise ValueError(f"experts {first_name!r} and {name!r} adapt different layers: trained on "
                             "different base models?")
        for key, tensor in mine.items():
            if tensor.shape != first[key].shape:
                raise ValueError(f"experts {first_name!r} and {name!r} were trained on different base models: "
                                 f"{key} is {tuple(first[key].shape)} vs {tuple(tensor.shape)}")


class MixedLinear(torch.nn.Module):
    """A frozen linear layer plus a mixture of n rank-r updates (see the module's docstring)."""

    def __init__(self, base: torch.nn.Linear, a: torch.Tensor, b: torch.Tensor, scales: torch.Tensor,
                 mixture: "Mixture"):
        super().__init__()
        self.base = base
        self.n, self.r = a.shape[0], a.shape[1]
        self.register_buffer("a", a.reshape(self.n * self.r, a.shape[2]).contiguous(), persistent=False)
        self.register_buffer("b", b.permute(1, 0, 2).reshape(b.shape[1], self.n * self.r).contiguous(),
                             persistent=False)
        self.register_buffer("scales", scales, persistent=False)
        object.__setattr__(self, "mixture", mixture)  # a back-reference, not a submodule
        self.router: torch.nn.Linear | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        w = self.mixture.weights_for(self, x)  # [rows or 1, tokens or 1, n], or None: no update
        if w is None:
            return out
        h = F.linear(x.to(self.a.dtype), self.a).unflatten(-1, (self.n, self.r))  # each expert's A x
        w = w.to(h.dtype).unsqueeze(-1)
        if self.mixture.method == "lorahub":
            mixed_a = (h * w).sum(-2, keepdim=True)  # (sum_i w_i A_i) x
            g = mixed_a * w * self.scales[0]  # each B_j's share: w_j (sum_i w_i A_i) x
        else:
            g = h * w * self.scales.unsqueeze(-1)
        return out + F.linear(g.flatten(-2), self.b).to(out.dtype)


class Mixture:
    """The frozen student with its adapted layers wrapped in :class:`MixedLinear`."""

    def __init__(self, student_dir: Path, expert_dirs: dict[str, Path], method: str = "lorahub",
                 dtype: str = "fp32", attention: str | None = None, model=None, prompt_format: str = "raw"):
        """``dtype`` may be ``auto`` (see :mod:`modecotd.precision`); ``attention`` defaults to the
        training loop's choice for this process's device, made here, where the model runs. With
        ``model`` (the student, already loaded by :func:`~modecotd.models.load_lm`), the experts are
        wired into it in place instead (``dtype`` and ``attention`` are then its own), until
        :meth:`detach`. ``prompt_format``: how the few-shot rows are laid out, as the experts were
        trained (student.prompt_format)."""
        from modecotd.distill import training_attention
        from modecotd.models import load_lm, load_tokenizer

        if not expert_dirs:
            raise ValueError("a mixture needs at least one expert")
        self.names = list(expert_dirs)
        self.objective = "token_mean"  # the few-shot loss: token_mean or per_row (see _loss)
        self.prompt_format = prompt_format
        loaded = {name: read_adapter(Path(path)) for name, path in expert_dirs.items()}
        self.configs = {name: config for name, (config, _) in loaded.items()}
        check_same_base({name: t for name, (_, t) in loaded.items()})
        self.use_method(method)
        self.tokenizer = load_tokenizer(Path(student_dir), padding_side="right")
        self.model = model if model is not None else load_lm(Path(student_dir), dtype,
                                                             attention or training_attention())
        self.precision = self.model.precision
        self.device = torch.device(self.precision.device)
        self.encoder_decoder = is_encoder_decoder(self.model)
        self.weights: torch.Tensor | None = None
        self._gate_log: list[torch.Tensor] | None = None
        scales = torch.tensor([lora_scale(self.configs[name]) for name in self.names])
        self.layers: dict[str, MixedLinear] = {}
        tensors = {name: t for name, (_, t) in loaded.items()}
        # Every path is checked before the first layer is replaced, so that a student passed in as
        # ``model`` is never left half-wired by experts that do not fit it.
        wiring = []
        for path in sorted({k[len(PEFT_PREFIX):].rsplit(".lora_", 1)[0] for k in tensors[self.names[0]]}):
            keys = {part: f"{PEFT_PREFIX}{path}.lora_{part}.weight" for part in ("A", "B")}
            missing = [n for n in self.names if any(k not in tensors[n] for k in keys.values())]
            if missing:
                raise ValueError(f"experts {missing} have no LoRA for {path}")
            parent, _, child = path.rpartition(".")
            holder = self.model.get_submodule(parent)
            wiring.append((path, holder, child, torch.stack([tensors[n][keys["A"]] for n in self.names]),
                           torch.stack([tensors[n][keys["B"]] for n in self.names])))
        for path, holder, child, a, b in wiring:
            base = getattr(holder, child)
            layer = MixedLinear(base, a.to(base.weight.dtype), b.to(base.weight.dtype),
                                scales.to(base.weight.dtype), self)
            setattr(holder, child, layer)
            self.layers[path] = layer
        self.model.to(self.device)

    def detach(self) -> None:
        """Put the student's own linear layers back: the model is the plain student again."""
        for path, layer in self.layers.items():
            parent, _, child = path.rpartition(".")
            setattr(self.model.get_submodule(parent), child, layer.base)
        self.layers = {}

    def use_method(self, method: str) -> None:
        """Switch how the experts are mixed (the student and experts stay loaded)."""
        if method not in METHODS:
            raise ValueError(f"unknown mixture method {method!r}; one of {', '.join(METHODS)}")
        check_compatible(self.configs, method)
        self.method = method

    # -- weights -------------------------------------------------------------------------------

    def set_weights(self, weights) -> None:
        """One weight per expert, ``[n]``, or one row of weights per batch row, ``[rows, n]``
        (a tensor that requires grad keeps its graph). ``None`` switches the experts off."""
        if weights is None:
            self.weights = None
            return
        w = weights if isinstance(weights, torch.Tensor) else torch.as_tensor(weights, dtype=torch.float32)
        w = w.to(self.device)
        if w.shape[-1] != len(self.names) or w.dim() not in (1, 2):
            raise ValueError(f"expected weights of shape [{len(self.names)}] or [rows, {len(self.names)}], "
                             f"got {list(w.shape)}")
        self.weights = w.view(1, 1, -1) if w.dim() == 1 else w.unsqueeze(1)

    def weights_for(self, layer: MixedLinear, x: torch.Tensor) -> torch.Tensor | None:
        if self.method != "gate":
            return self.weights
        if layer.router is None:
            raise RuntimeError("the gate has no routers: fit_gate() or load_routers() first")
        w = torch.softmax(layer.router(x.to(layer.router.weight.dtype)), dim=-1)
        if self._gate_log is not None:
            self._gate_log.append(w.detach().reshape(-1, w.shape[-1]).mean(0))
        return w

    # -- the gate --------------------------------------------------------------------------------

    def add_routers(self) -> None:
        """A fresh router per mixed layer, zero-initialised: every expert weighs 1/n at first."""
        for layer in self.layers.values():
            layer.router = torch.nn.Linear(layer.a.shape[1], layer.n, device=self.device)
            torch.nn.init.zeros_(layer.router.weight)
            torch.nn.init.zeros_(layer.router.bias)

    def fit_gate(self, batch: dict[str, torch.Tensor], *, steps: int, learning_rate: float,
                 seed: int = 0, on_step=lambda: None) -> list[float]:
        """Train fresh routers on ``batch`` (full-batch AdamW; student and experts stay frozen);
        returns the loss per step. ``on_step`` is called after each step (progress)."""
        self.use_method("gate")
        torch.manual_seed(seed)
        self.add_routers()
        routers = [p for layer in self.layers.values() for p in layer.router.parameters()]
        optimizer = torch.optim.AdamW(routers, lr=learning_rate, weight_decay=0.0)
        losses = []
        with torch.enable_grad():
            for _ in range(steps):
                loss = self._loss(batch)[0]
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                losses.append(float(loss.detach()))
                on_step()
        return losses

    @torch.no_grad()
    def mean_gate_weights(self, batch: dict[str, torch.Tensor]) -> list[float]:
        """The gate's weight for each expert, averaged over the batch's positions and the layers."""
        self._gate_log = []
        try:
            self.model(**{k: v for k, v in batch.items() if k != "labels"},
                       **({"labels": batch["labels"]} if self.encoder_decoder else {}))
            return torch.stack(self._gate_log).mean(0).tolist()
        finally:
            self._gate_log = None

    def save_routers(self, path: Path) -> Path:
        from safetensors.torch import save_file

        save_file({f"{name}.router.{key}": value.detach().contiguous() for name, layer in self.layers.items()
                   for key, value in layer.router.state_dict().items()}, str(path))
        return Path(path)

    def load_routers(self, path: Path) -> None:
        from safetensors.torch import load_file

        state = load_file(str(path))
        self.add_routers()
        for name, layer in self.layers.items():
            layer.router.load_state_dict({key: state[f"{name}.router.{key}"] for key in ("weight", "bias")})
        self.use_method("gate")

    # -- the few-shot objective ----------------------------------------------------------------

    def batch_for(self, rows: list[dict], kind: AnswerKind, max_length: int) -> dict[str, torch.Tensor]:
        examples, _ = tokenize_rows(rows, kind, self.tokenizer, max_length, self.encoder_decoder, self.prompt_format)
        if not examples:
            raise ValueError("no few-shot example fits in max_length")
        return collate(examples, self.tokenizer.pad_token_id, self.device)

    def _loss(self, batch: dict[str, torch.Tensor], candidates: int = 1) -> torch.Tensor:
        """Mean target-token cross-entropy of each candidate's rows (the batch holds ``candidates``
        equal blocks of rows): tokens, not examples, weigh equally. With :attr:`objective`
        ``per_row`` that mean is divided by the number of rows, as the authors' code does (it sums
        the batches' mean losses and divides by the examples; with all rows in one batch, this)."""
        losses, mask = token_losses(self.model, batch)
        losses, mask = losses.view(candidates, -1), mask.view(candidates, -1)
        mean = (losses * mask).sum(1) / mask.sum(1).clamp(min=1)
        if self.objective == "per_row":
            return mean / (batch["input_ids"].shape[0] // candidates)
        return mean

    @torch.no_grad()
    def few_shot_loss(self, batch: dict[str, torch.Tensor]) -> float:
        """The few-shot loss at the current weights: mean cross-entropy over all target tokens."""
        return float(self._loss(batch)[0])

    @torch.no_grad()
    def candidate_losses(self, batch: dict[str, torch.Tensor], candidates: torch.Tensor,
                         max_rows: int | None = None) -> list[float]:
        """The few-shot loss of each candidate weight vector (``[candidates, n]``), many candidates
        per forward: the batch is repeated once per candidate with that candidate's weights on its
        rows, in forwards of at most ``max_rows`` rows (default: :data:`ROWS_PER_FORWARD` for the
        model's device)."""
        max_rows = ROWS_PER_FORWARD.resolve("auto" if max_rows is None else max_rows, self.device)
        examples = batch["input_ids"].shape[0]
        per_forward = max(1, max_rows // examples)
        out: list[float] = []
        for start in range(0, candidates.shape[0], per_forward):
            chunk = candidates[start:start + per_forward]
            repeated = {k: v.repeat(chunk.shape[0], 1) for k, v in batch.items()}
            self.set_weights(chunk.repeat_interleave(examples, dim=0))
            out.extend(self._loss(repeated, chunk.shape[0]).tolist())
        return out

    def loss_and_gradient(self, batch: dict[str, torch.Tensor], weights) -> tuple[float, list[float]]:
        """The few-shot loss at ``weights`` and its gradient with respect to them."""
        w = torch.as_tensor(weights, dtype=torch.float32, device=self.device).clone().requires_grad_(True)
        self.set_weights(w)
        with torch.enable_grad():
            loss = self._loss(batch)[0]
            (gradient,) = torch.autograd.grad(loss, w)
        self.set_weights(w.detach())
        return float(loss.detach()), gradient.tolist()


def export_adapter(expert_dirs: dict[str, Path], method: str, weights, out_dir: Path) -> Path:
    """Write the mixture of ``expert_dirs`` at ``weights`` as one standard peft LoRA adapter folder
    that loads with ``PeftModel.from_pretrained`` and gives the live :class:`Mixture`'s outputs:
    lorahub at the experts' rank; delta at their ranks stacked (A rows carry each expert's weight
    and scale, scale 1). A gate mixes per token and has no such adapter."""
    from safetensors.torch import save_file

    if method not in ("lorahub", "delta"):
        raise ValueError(f"a {method} mixture has no single merged adapter")
    names = list(expert_dirs)
    loaded = {name: read_adapter(expert_dirs[name]) for name in names}
    configs = {name: config for name, (config, _) in loaded.items()}
    check_compatible(configs, method)
    w = torch.as_tensor(weights, dtype=torch.float32)
    config = dict(configs[names[0]])
    tensors = {}
    for key in loaded[names[0]][1]:
        if ".lora_A." not in key:
            continue
        b_key = key.replace(".lora_A.", ".lora_B.")
        a = torch.stack([loaded[n][1][key] for n in names])  # [n, r, in]
        b = torch.stack([loaded[n][1][b_key] for n in names])  # [n, out, r]
        if method == "lorahub":
            tensors[key], tensors[b_key] = torch.einsum("i,ijk->jk", w, a), torch.einsum("i,ijk->jk", w, b)
        else:
            scales = torch.tensor([lora_scale(configs[n]) for n in names])
            tensors[key] = (a * (w * scales)[:, None, None]).flatten(0, 1)
            tensors[b_key] = b.permute(1, 0, 2).flatten(1)
    if method == "delta":
        rank = len(names) * config["r"]
        config.update(r=rank, lora_alpha=rank, use_rslora=False)
    config.update(rank_pattern={}, alpha_pattern={}, inference_mode=True)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(out_dir / "adapter_model.safetensors"))
    (out_dir / "adapter_config.json").write_text(json.dumps(config, indent=2))
    return out_dir
