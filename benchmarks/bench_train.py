"""Training-speed benchmark: matmul peak, training throughput / MFU, peak memory, bf16 vs fp32.

Prints figures; it checks nothing (no thresholds). See benchmarks/README.md for how to read them.

    python benchmarks/bench_train.py                      # default shapes, threads 1 and 2, fp32 + bf16
    python benchmarks/bench_train.py --quick              # nano shapes, 2 timed steps (seconds)
    python benchmarks/bench_train.py --equal-steps 200    # fp32 vs bf16 autocast validation loss

Sections of one run:

1. matmul peak: achieved FLOP/s of a square matmul (``--matmul-size``) in fp32 and bf16 for every
   thread count: the ceiling the training figures are compared with.
2. training throughput: one full training step (forward + backward + grad clip + AdamW(foreach)
   step, as sunfish.training.loop does it) for our stage-0 StagedLM, our DiffusionLM and a plain
   nanoGPT-style GPT of the same shape, in fp32 and under ``torch.autocast("cpu", bfloat16)``.
   FLOPs per token follow the PaLM / nanoGPT MFU estimate: ``6 * N + 12 * n_layer * seq_len *
   d_model`` (N = matmul parameters: every parameter except lookup-only embedding tables; a head
   tied to the token table counts once, as a matmul). %peak = achieved FLOP/s over the matmul peak
   of the same precision and thread count.
   Each later stage of the staged model (``--stages``: stage 1, 2 with its K-1 hook, 3 with graph
   routing, and stage 0 with ``mu.full: false``) is timed at the same shape and compared with
   stage 0 (``vs stage0``; issue 3: no stage may cost more than 2x stage 0).
3. peak memory (max RSS) of two training steps at the micro shape, each in a fresh subprocess.
4. ``--equal-steps N``: the same model trained N steps in fp32 and in bf16 autocast from the same
   seed on the same real batches (data/prepared/train.bin), validation loss of each.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from anywhere: import sunfish from the checkout
    sys.path.insert(0, str(ROOT))

DEFAULT_JSON = "reports/benchmarks/train.json"
PRECISIONS = ("fp32", "bf16")


# ----------------------------------------------------------------------------------------------
# the reference: a minimal plain-PyTorch GPT (nanoGPT style)


@dataclass(frozen=True)
class Shape:
    """What "the same shape" means here: the transformer's sizes, the vocabulary and the sequence."""

    n_layer: int
    n_head: int
    d_model: int
    d_ff: int
    vocab_size: int
    seq_len: int

    def label(self) -> str:
        return f"L{self.n_layer} H{self.n_head} d{self.d_model} ff{self.d_ff} V{self.vocab_size} T{self.seq_len}"


class GPTBlock(nn.Module):
    def __init__(self, s: Shape):
        super().__init__()
        self.n_head = s.n_head
        self.ln_1 = nn.LayerNorm(s.d_model, bias=False)
        self.qkv = nn.Linear(s.d_model, 3 * s.d_model, bias=False)
        self.proj = nn.Linear(s.d_model, s.d_model, bias=False)
        self.ln_2 = nn.LayerNorm(s.d_model, bias=False)
        self.fc = nn.Linear(s.d_model, s.d_ff, bias=False)
        self.fc_proj = nn.Linear(s.d_ff, s.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln_1(x)).split(d, dim=2)
        q, k, v = (z.view(b, t, self.n_head, d // self.n_head).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(y.transpose(1, 2).reshape(b, t, d))
        return x + self.fc_proj(F.gelu(self.fc(self.ln_2(x))))


class PlainGPT(nn.Module):
    """Token + learned position embedding, pre-LN blocks, causal SDPA, GELU MLP, tied head."""

    kind = "gpt"

    def __init__(self, s: Shape):
        super().__init__()
        self.shape = s
        self.wte = nn.Embedding(s.vocab_size, s.d_model)
        self.wpe = nn.Embedding(s.seq_len, s.d_model)
        self.blocks = nn.ModuleList(GPTBlock(s) for _ in range(s.n_layer))
        self.ln_f = nn.LayerNorm(s.d_model, bias=False)
        self.head = nn.Linear(s.d_model, s.vocab_size, bias=False)
        self.head.weight = self.wte.weight  # tied
        for name, p in self.named_parameters():
            if p.dim() >= 2:
                std = 0.02 / math.sqrt(2 * s.n_layer) if name.endswith(("proj.weight", "fc_proj.weight")) else 0.02
                nn.init.normal_(p, 0.0, std)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(idx.size(1), device=idx.device)
        x = self.wte(idx) + self.wpe(pos)
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))

    def _summed_nll(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self(batch["input_ids"])
        targets = batch["targets"]
        total = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100, reduction="sum")
        return total, (targets != -100).sum()

    def training_loss(self, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        total, n = self._summed_nll(batch)
        loss = total / n.clamp(min=1)
        return loss, {"loss": float(loss.detach())}

    @torch.no_grad()
    def nll(self, batch: dict, generator: torch.Generator | None = None) -> tuple[torch.Tensor, int]:
        total, n = self._summed_nll(batch)
        return total.double(), int(n)


# ----------------------------------------------------------------------------------------------
# models under test, their batches and their FLOPs


@dataclass
class Workload:
    """One model to time: how to build it, a batch for it and its FLOPs per token."""

    name: str  # row name: stage0/tiny, stage3/tiny, stage0-plain/tiny, cfg/micro, gpt/tiny
    model: str  # stage0 | stage1 | stage2 | stage3 | stage0-plain | cfg | gpt
    preset: str
    shape: Shape
    batch_size: int
    reference: str | None = None  # row name of the plain GPT of the same shape
    stage_reference: str | None = None  # row name of stage 0 at the same shape (later stages)

    @property
    def staged(self) -> bool:
        return self.model.startswith("stage")

    def build(self, ctx: Context) -> nn.Module:
        p, s = ctx.params, self.shape
        preset = p.presets[self.preset].model_copy(update={"seq_len": s.seq_len})
        if self.staged:
            from sunfish.models.staged import StagedLM, StagedLMConfig

            staged = p.staged
            if self.model == "stage0-plain":
                staged = staged.model_copy(update={"mu": staged.mu.model_copy(update={"full": False})})
            stage = 0 if self.model == "stage0-plain" else int(self.model[5:])
            config = StagedLMConfig.from_params(staged, preset, vocab_size=ctx.vocab_size, stage=stage, eos_id=ctx.eos_id)
            return StagedLM(config)
        if self.model == "cfg":
            from sunfish.models.denoiser import DiffusionConfig, DiffusionLM

            config = DiffusionConfig.from_params(p.cfg, preset, ctx.vocab_size, pad_id=ctx.pad_id, eos_id=ctx.eos_id)
            return DiffusionLM(config)
        return PlainGPT(s)

    def batch(self, ctx: Context, gen: torch.Generator) -> dict[str, torch.Tensor]:
        b, t, v = self.batch_size, self.shape.seq_len, self.shape.vocab_size
        if self.model == "cfg":  # PairDataset's keys: full texts, prompts of random length
            p_len = ctx.params.cfg.max_prompt_tokens
            lengths = torch.randint(4, p_len + 1, (b, 1), generator=gen)
            return {
                "text_ids": torch.randint(2, v, (b, t), generator=gen),
                "text_mask": torch.ones(b, t, dtype=torch.bool),
                "prompt_ids": torch.randint(2, v, (b, p_len), generator=gen),
                "prompt_mask": torch.arange(p_len).unsqueeze(0) < lengths,
            }
        ids = torch.randint(0, v, (b, t + 1), generator=gen)
        return {"input_ids": ids[:, :-1].contiguous(), "targets": ids[:, 1:].contiguous()}

    def flops_per_token(self, model: nn.Module, ctx: Context) -> tuple[int, int]:
        """(matmul parameters N, training FLOPs per token 6N + 12 L T d [+ cross-attention term])."""
        n = matmul_parameters(model)
        s = self.shape
        flops = 6 * n + 12 * s.n_layer * s.seq_len * s.d_model
        if self.model == "cfg":  # cross-attention reads 1 + max_prompt_tokens memory slots
            flops += 12 * s.n_layer * (1 + ctx.params.cfg.max_prompt_tokens) * s.d_model
        return n, flops


def matmul_parameters(model: nn.Module) -> int:
    """Every parameter except embedding tables that are only looked up (a tied head counts once)."""
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    heads = {id(m.weight) for m in model.modules() if isinstance(m, nn.Linear)}
    n = sum(p.numel() for p in model.parameters() if id(p) not in embeddings or id(p) in heads)
    if getattr(model, "kind", "") == "diffusion" and model.config.objective == "masked":
        n += model.config.vocab_size * model.config.d_model  # token_logits: hidden @ embedding.T
    return n


class Context:
    """params.yaml, the vocabulary and special ids (from data/prepared/meta.json when there)."""

    def __init__(self, params_path: str, data_dir: str):
        from sunfish.config import load_params

        self.params = load_params(params_path)
        self.data_dir = Path(data_dir)
        meta_path = self.data_dir / "meta.json"
        if meta_path.exists():
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
            self.vocab_size, self.eos_id, self.pad_id = meta["vocab_size"], meta["eos_id"], meta["pad_id"]
            self.vocab_source = str(meta_path)
        else:
            self.vocab_size, self.eos_id, self.pad_id = self.params.tokenizer.vocab_size, 0, 1
            self.vocab_source = "params.yaml tokenizer.vocab_size"

    def shape(self, preset: str, seq_len: int | None) -> Shape:
        if preset not in self.params.presets:
            raise SystemExit(f"unknown preset {preset!r}; params.yaml has {sorted(self.params.presets)}")
        pr = self.params.presets[preset]
        return Shape(pr.n_layer, pr.n_head, pr.d_model, pr.d_ff, pr.vocab_size or self.vocab_size, seq_len or pr.seq_len)

    def training(self, max_steps: int = 10):
        """The pipeline's stage-0 training settings (lr, betas, weight decay, clip, ...)."""
        t = self.params.training_for("stage_0")
        return t.model_copy(update={"max_steps": max_steps, "warmup_steps": min(t.warmup_steps, max(1, max_steps // 8))})


def workloads(ctx: Context, args) -> list[Workload]:
    """Our models at the requested presets, each plain GPT (one per shape) after the last row using it."""
    ours: list[Workload] = []
    gpt_by_shape: dict[Shape, Workload] = {}
    b = args.batch_size or ctx.params.train.batch_size
    for model, presets in (("stage0", args.staged_presets), ("cfg", args.cfg_presets)):
        for preset in presets:
            shape = ctx.shape(preset, args.seq_len)
            if shape not in gpt_by_shape:
                name = f"gpt/{preset}"
                if any(g.name == name for g in gpt_by_shape.values()):  # same preset, other seq_len
                    name = f"gpt/{preset}-T{shape.seq_len}"
                gpt_by_shape[shape] = Workload(name, "gpt", preset, shape, b)
            ours.append(Workload(f"{model}/{preset}", model, preset, shape, b, reference=gpt_by_shape[shape].name))
            if model == "stage0":
                for later in args.stages:
                    name = "stage0-plain" if later == "plain" else f"stage{later}"
                    ours.append(Workload(f"{name}/{preset}", name, preset, shape, b, reference=gpt_by_shape[shape].name,
                                         stage_reference=f"stage0/{preset}"))
    ordered = list(ours)
    for gpt in gpt_by_shape.values():
        last = max(i for i, w in enumerate(ordered) if w.reference == gpt.name)
        ordered.insert(last + 1, gpt)
    return ordered


# ----------------------------------------------------------------------------------------------
# measurements


class OtherLoad:
    """CPU cores used by OTHER processes while the block ran (from /proc/stat minus our own CPU
    time): a row timed while something else was busy is not a clean figure. None off Linux."""

    def __enter__(self):
        self.start = (_busy_seconds(), _own_seconds(), time.perf_counter())
        return self

    def __exit__(self, *exc):
        busy, own, wall = _busy_seconds(), _own_seconds(), time.perf_counter()
        if busy is None or self.start[0] is None:
            self.cores = None
        else:
            other = (busy - self.start[0]) - (own - self.start[1])
            self.cores = max(0.0, other / max(wall - self.start[2], 1e-9))
        return False


def _busy_seconds() -> float | None:
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    busy = sum(fields[:8]) - idle  # user nice system idle iowait irq softirq steal (guest is in user)
    return busy / os.sysconf("SC_CLK_TCK")


def _own_seconds() -> float:
    t = os.times()
    return t.user + t.system


def autocast(precision: str):
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")


def matmul_peak(size: int, repeats: int, threads: int) -> dict[str, float]:
    """GFLOP/s of ``size x size @ size x size`` (best of ``repeats`` after 2 warmups) per precision."""
    torch.set_num_threads(threads)
    out = {}
    gen = torch.Generator().manual_seed(0)
    for precision in PRECISIONS:
        dtype = torch.float32 if precision == "fp32" else torch.bfloat16
        a = torch.randn(size, size, generator=gen).to(dtype)
        b = torch.randn(size, size, generator=gen).to(dtype)
        for _ in range(2):
            torch.mm(a, b)
        times = []
        with OtherLoad() as other:
            for _ in range(repeats):
                start = time.perf_counter()
                torch.mm(a, b)
                times.append(time.perf_counter() - start)
        out[precision] = 2 * size**3 / min(times) / 1e9
        out[f"{precision}_other_cores"] = other.cores
    return out


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, batch: dict, precision: str, clip: float,
               after_clip=None, step: int = 1) -> float:
    """One step as sunfish.training.loop does it: autocast forward, backward, clip, [K-1], AdamW, zero_grad."""
    with autocast(precision):
        loss, _ = model.training_loss(batch)
    loss.backward()
    if clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    if after_clip is not None:
        after_clip(model, step)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(loss.detach())


def make_optimizer(model: nn.Module, ctx: Context, max_steps: int = 10) -> torch.optim.Optimizer:
    from sunfish.training.loop import make_optimizer as pipeline_optimizer

    return pipeline_optimizer(model, ctx.training(max_steps), torch.device("cpu"))  # AdamW(foreach=True)


def time_training(w: Workload, ctx: Context, precision: str, threads: int, warmup: int, steps: int) -> dict:
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = w.build(ctx)
    model.train()
    optimizer = make_optimizer(model, ctx)
    clip = ctx.params.train.grad_clip
    after_clip = None
    if getattr(model, "uses_k1", False):  # stage 2 on: the pipeline's K-1 hook, as train_staged sets it
        from sunfish.training.k1 import make_k1_hook

        k1 = ctx.params.staged.k1
        after_clip = make_k1_hook(k1.mode, k1.path_mass, every=ctx.params.train.log_every)
    gen = torch.Generator().manual_seed(1)
    batches = [w.batch(ctx, gen) for _ in range(2)]
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:  # the first warmup step also counts matmul FLOPs
        train_step(model, optimizer, batches[0], precision, clip, after_clip, 1)
    for i in range(1, warmup):
        train_step(model, optimizer, batches[i % 2], precision, clip, after_clip, 1 + i)
    times, losses = [], []
    with OtherLoad() as other:
        for i in range(steps):
            start = time.perf_counter()
            losses.append(train_step(model, optimizer, batches[i % 2], precision, clip, after_clip, 1 + warmup + i))
            times.append(time.perf_counter() - start)
    n_matmul, flops_tok = w.flops_per_token(model, ctx)
    tokens = w.batch_size * w.shape.seq_len
    # the counter sees mm/bmm/conv but not the CPU SDPA kernels: add the formula's attention term
    counted_tok = counter.get_total_flops() / tokens + (flops_tok - 6 * n_matmul)
    median = statistics.median(times)
    return {
        "name": w.name, "model": w.model, "preset": w.preset, "shape": asdict(w.shape),
        "batch_size": w.batch_size, "precision": precision, "threads": threads,
        "parameters": sum(p.numel() for p in model.parameters()), "matmul_parameters": n_matmul,
        "flops_per_token": flops_tok, "counted_flops_per_token": counted_tok, "tokens_per_step": tokens,
        "step_s_median": median, "step_s_min": min(times), "step_s_max": max(times), "step_s": times,
        "tokens_per_s": tokens / median, "gflops": flops_tok * tokens / median / 1e9,
        "gflops_counted": counted_tok * tokens / median / 1e9,
        "loss_first": losses[0], "loss_last": losses[-1], "reference": w.reference,
        "stage_reference": w.stage_reference, "other_cores": other.cores,
    }


def peak_memory(w: Workload, args, precision: str, threads: int) -> dict:
    """Max RSS of a fresh interpreter that builds ``w`` and runs two training steps (AdamW state
    exists from the first step on, so the second step is the steady-state peak)."""
    spec = {"name": w.name, "model": w.model, "preset": w.preset, "shape": asdict(w.shape),
            "batch_size": w.batch_size, "precision": precision, "threads": threads,
            "params": args.params, "data": args.data}
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--memory-child", json.dumps(spec)],
        capture_output=True, text=True, cwd=str(ROOT),
    )
    after = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    if proc.returncode != 0:
        return {**spec, "error": proc.stderr.strip().splitlines()[-1:] or ["failed"]}
    child = json.loads(proc.stdout.strip().splitlines()[-1])
    # RUSAGE_CHILDREN is the max over all children so far (and a child starts from the parent's own
    # ru_maxrss, kept across execve): it names this child only when it grew
    child["rusage_children_gb"] = after / 2**20 if after > before else None
    return {**spec, **child}


def _proc_status_gb(key: str) -> float | None:
    """VmRSS (now) or VmHWM (peak) of this process in GiB, from /proc/self/status (Linux)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 2**20  # kB -> GiB
    except OSError:
        pass
    return None


def memory_child(spec_json: str) -> None:
    """Runs in the fresh interpreter. Linux keeps ru_maxrss across execve (the child would report the
    parent's peak), so the peak is VmHWM, which starts afresh with the new address space."""
    spec = json.loads(spec_json)

    def rss() -> float:
        now = _proc_status_gb("VmRSS")
        return now if now is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20

    ctx = Context(spec["params"], spec["data"])
    torch.set_num_threads(spec["threads"])
    w = Workload(spec["name"], spec["model"], spec["preset"], Shape(**spec["shape"]), spec["batch_size"])
    after_import = rss()
    model = w.build(ctx)
    model.train()
    optimizer = make_optimizer(model, ctx)
    batch = w.batch(ctx, torch.Generator().manual_seed(1))
    after_build = rss()
    for _ in range(2):
        train_step(model, optimizer, batch, spec["precision"], ctx.params.train.grad_clip)
    peak = _proc_status_gb("VmHWM")
    print(json.dumps({"after_import_gb": after_import, "after_build_gb": after_build,
                      "peak_gb": peak if peak is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
                      "rusage_self_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}))


# ----------------------------------------------------------------------------------------------
# fp32 vs bf16 at equal steps


def equal_steps(ctx: Context, args) -> dict:
    from sunfish.data.dataset import TokenStream
    from sunfish.training.loop import lr_at

    train_bin, val_bin = ctx.data_dir / "train.bin", ctx.data_dir / "val.bin"
    if not (train_bin.exists() and val_bin.exists()):
        raise SystemExit(
            f"--equal-steps needs real tokens: {train_bin} and {val_bin} are missing.\n"
            "Create them with `dvc repro prepare` (writes data/prepared/), or point --data at a folder\n"
            "written by sunfish.data.prepare.prepare_corpus(params.data, params.tokenizer, DIR, 'data/corpora')."
        )
    shape = ctx.shape(args.equal_preset, args.seq_len)
    b = args.batch_size or ctx.params.train.batch_size
    w = Workload(f"{args.equal_model}/{args.equal_preset}", args.equal_model, args.equal_preset, shape, b)
    tcfg = ctx.training(args.equal_steps)
    train_stream, val_stream = TokenStream(train_bin), TokenStream(val_bin)
    threads = args.equal_threads or os.cpu_count() or 1
    torch.set_num_threads(threads)
    out = {"model": w.name, "shape": asdict(shape), "batch_size": b, "steps": args.equal_steps, "threads": threads,
           "lr": tcfg.lr, "warmup_steps": tcfg.warmup_steps,
           "eval_tokens": args.eval_batches * b * shape.seq_len, "runs": {}}
    seed = args.equal_seed if args.equal_seed is not None else tcfg.seed
    out["seed"] = seed
    runs = [(precision, precision, seed) for precision in args.precision]
    if args.noise_run:  # the yardstick: fp32 again with other initial weights and batches
        runs.append((f"fp32 seed {seed + 1}", "fp32", seed + 1))
    for label, precision, seed in runs:
        torch.manual_seed(seed)
        model = w.build(ctx)
        model.train()
        optimizer = make_optimizer(model, ctx, args.equal_steps)
        gen = torch.Generator().manual_seed(seed)  # the same batches in the fp32 and bf16 runs
        start = time.perf_counter()
        curve = []
        other = OtherLoad().__enter__()
        for step in range(args.equal_steps):
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, tcfg)
            loss = train_step(model, optimizer, train_stream.sample_batch(b, shape.seq_len, gen), precision, tcfg.grad_clip)
            curve.append(loss)
            if (step + 1) % max(1, args.equal_steps // 10) == 0:
                print(f"  {label} step {step + 1}/{args.equal_steps} loss {loss:.4f} "
                      f"({time.perf_counter() - start:.0f}s)", flush=True)
        seconds = time.perf_counter() - start
        other.__exit__(None, None, None)
        model.eval()
        val = {}
        for eval_precision in PRECISIONS:  # the trained weights are fp32 either way
            total, count = 0.0, 0
            with torch.no_grad(), autocast(eval_precision):
                for batch in val_stream.eval_batches(shape.seq_len, b, max_tokens=out["eval_tokens"]):
                    nats, n = model.nll(batch)
                    total, count = total + float(nats), count + n
            val[eval_precision] = total / max(count, 1)
        out["runs"][label] = {
            "val_loss_fp32_eval": val["fp32"], "val_loss_bf16_eval": val["bf16"],
            "train_loss_last10": sum(curve[-10:]) / len(curve[-10:]), "train_seconds": seconds,
            "tokens_per_s": args.equal_steps * b * shape.seq_len / seconds, "other_cores": other.cores, "curve": curve,
        }
    f32, b16 = out["runs"].get("fp32"), out["runs"].get("bf16")
    if f32 and b16:
        out["val_loss_rel_diff"] = (b16["val_loss_fp32_eval"] - f32["val_loss_fp32_eval"]) / f32["val_loss_fp32_eval"]
        out["bf16_speedup"] = b16["tokens_per_s"] / f32["tokens_per_s"]
    if args.noise_run and f32:
        other = out["runs"][runs[-1][0]]
        out["seed_noise_rel_diff"] = (other["val_loss_fp32_eval"] - f32["val_loss_fp32_eval"]) / f32["val_loss_fp32_eval"]
    return out


# ----------------------------------------------------------------------------------------------
# environment and printing


def bf16_capabilities() -> dict[str, bool]:
    """Native bf16 on this CPU: torch.cpu.get_capabilities() (torch >= 2.13, any OS; ARM reports
    ``bf16``), else /proc/cpuinfo flags. get_cpu_capability() ("AVX512") cannot tell: Skylake-X
    has AVX512 without AVX512-BF16."""
    get = getattr(torch.cpu, "get_capabilities", None)
    if get is not None:
        caps = get()
        return {k: bool(caps.get(k, False)) for k in ("avx512_bf16", "amx_bf16", "bf16")}
    flags: set[str] = set()
    for line in _cpuinfo_lines():
        if line.startswith(("flags", "Features")):  # x86 / ARM
            flags = set(line.split(":", 1)[1].split())
            break
    return {"avx512_bf16": "avx512_bf16" in flags, "amx_bf16": "amx_bf16" in flags, "bf16": "bf16" in flags}


def environment() -> dict:
    model_name = next((line.split(":", 1)[1].strip() for line in _cpuinfo_lines() if line.startswith("model name")), "")
    try:
        mkldnn_bf16 = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except Exception:  # private op: absent on some builds
        mkldnn_bf16 = None
    return {
        "torch": torch.__version__, "python": platform.python_version(), "cpu": model_name or platform.processor(),
        "cpu_count": os.cpu_count(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        **bf16_capabilities(), "mkldnn_bf16": mkldnn_bf16,
    }


def _cpuinfo_lines() -> list[str]:
    try:
        return Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return []


def loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def table(headers: list[str], rows: list[list[str]], right: set[int] | None = None) -> str:
    right = right if right is not None else set(range(1, len(headers)))
    widths = [max(len(str(r[i])) for r in [headers, *rows]) for i in range(len(headers))]
    def fmt(r):
        return "  ".join(str(c).rjust(widths[i]) if i in right else str(c).ljust(widths[i]) for i, c in enumerate(r))
    return "\n".join([fmt(headers), "  ".join("-" * x for x in widths), *(fmt(r) for r in rows)])


def print_peak(peaks: dict) -> None:
    rows = [[str(t), f"{v['fp32']:.1f}", f"{v['bf16']:.1f}", f"{v['bf16'] / v['fp32']:.2f}x",
             _cores(max(v["fp32_other_cores"] or 0, v["bf16_other_cores"] or 0))] for t, v in peaks.items()]
    print(table(["threads", "fp32 GFLOP/s", "bf16 GFLOP/s", "bf16/fp32", "other load"], rows))


def _cores(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


def print_training(rows: list[dict], peaks: dict) -> None:
    by_key = {(r["name"], r["precision"], r["threads"]): r for r in rows}
    out = []
    for r in rows:
        ref = by_key.get((r["reference"], r["precision"], r["threads"])) if r["reference"] else None
        peak = peaks[str(r["threads"])][r["precision"]]
        out.append([
            r["name"], r["precision"], str(r["threads"]), f"{r['parameters'] / 1e6:.2f}M",
            f"{r['flops_per_token'] / 1e6:.1f}M", f"{r['counted_flops_per_token'] / 1e6:.1f}M",
            f"{r['step_s_median']:.3f}", f"{r['step_s_min']:.3f}-{r['step_s_max']:.3f}", f"{r['tokens_per_s']:,.0f}",
            f"{r['gflops']:.1f}", f"{100 * r['gflops'] / peak:.0f}%", f"{100 * r['gflops_counted'] / peak:.0f}%",
            f"{r['tokens_per_s'] / ref['tokens_per_s']:.2f}x" if ref else "-", _cores(r["other_cores"]),
        ])
    print(table(["model", "prec", "thr", "params", "FLOP/tok", "counted", "step s", "min-max s", "tok/s",
                 "GFLOP/s", "%peak", "%peak cnt", "vs GPT", "other load"], out, right=set(range(2, 14))))


def print_stages(rows: list[dict]) -> None:
    """Each later stage (and stage 0 without MU refinement) against stage 0 at the same shape."""
    by_key = {(r["name"], r["precision"], r["threads"]): r for r in rows}
    out = []
    for r in rows:
        ref = by_key.get((r.get("stage_reference"), r["precision"], r["threads"]))
        if ref is None:
            continue
        out.append([r["name"], r["precision"], str(r["threads"]), f"{r['tokens_per_s']:,.0f}",
                    f"{ref['tokens_per_s']:,.0f}", f"{r['tokens_per_s'] / ref['tokens_per_s']:.2f}x",
                    _cores(r["other_cores"])])
    if out:
        print(table(["model", "prec", "thr", "tok/s", "stage0 tok/s", "vs stage0", "other load"],
                    out, right=set(range(2, 6))))


def print_summary(rows: list[dict]) -> None:
    """bf16 against fp32 (and our bf16 against the plain GPT in fp32), then thread scaling."""
    by_key = {(r["name"], r["precision"], r["threads"]): r for r in rows}
    names = list(dict.fromkeys(r["name"] for r in rows))
    threads = list(dict.fromkeys(r["threads"] for r in rows))
    tps = lambda n, p, t: by_key[(n, p, t)]["tokens_per_s"] if (n, p, t) in by_key else None  # noqa: E731
    ratio = lambda a, b: f"{a / b:.2f}x" if a and b else "-"  # noqa: E731
    out = []
    for t in threads:
        for n in names:
            ref = next(r["reference"] for r in rows if r["name"] == n)
            f32, b16 = tps(n, "fp32", t), tps(n, "bf16", t)
            out.append([n, str(t), f"{f32:,.0f}" if f32 else "-", f"{b16:,.0f}" if b16 else "-", ratio(b16, f32),
                        ratio(b16, tps(ref, "fp32", t)) if ref else "-"])
    print(table(["model", "thr", "fp32 tok/s", "bf16 tok/s", "bf16/fp32", "bf16 vs GPT fp32"], out))
    if len(threads) > 1:
        out = []
        for p in dict.fromkeys(r["precision"] for r in rows):
            for n in names:
                first, last = tps(n, p, threads[0]), tps(n, p, threads[-1])
                out.append([n, p, *(f"{tps(n, p, t):,.0f}" if tps(n, p, t) else "-" for t in threads), ratio(last, first)])
        print()
        print(table(["model", "prec", *(f"tok/s {t}thr" for t in threads), f"{threads[-1]}thr/{threads[0]}thr"], out))


def print_memory(mem: list[dict]) -> None:
    rows = []
    for m in mem:
        if "error" in m:
            rows.append([m["name"], m["precision"], str(m["threads"]), "error: " + " ".join(m["error"]), "", ""])
            continue
        rows.append([m["name"], m["precision"], str(m["threads"]), f"{m['after_import_gb']:.2f}",
                     f"{m['after_build_gb']:.2f}", f"{m['peak_gb']:.2f}"])
    print(table(["model", "prec", "thr", "torch GiB", "built GiB", "peak GiB"], rows))


def print_equal(eq: dict) -> None:
    rows = []
    for precision, r in eq["runs"].items():
        rows.append([precision, f"{r['val_loss_fp32_eval']:.4f}", f"{r['val_loss_bf16_eval']:.4f}",
                     f"{r['train_loss_last10']:.4f}", f"{r['tokens_per_s']:,.0f}", f"{r['train_seconds']:.0f}",
                     _cores(r["other_cores"])])
    print(table(["trained in", "val loss (fp32 eval)", "val loss (bf16 eval)", "train loss (last 10)",
                 "tok/s", "seconds", "other load"], rows))
    if "val_loss_rel_diff" in eq:
        print(f"bf16 - fp32 val loss: {100 * eq['val_loss_rel_diff']:+.2f}% of fp32; "
              f"bf16 speedup {eq['bf16_speedup']:.2f}x")
    if "seed_noise_rel_diff" in eq:
        print(f"seed noise (fp32, other seed - fp32): {100 * eq['seed_noise_rel_diff']:+.2f}% of fp32")


# ----------------------------------------------------------------------------------------------
# command line


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    def names(s: str) -> list[str]:
        return [x for x in s.split(",") if x]

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default=str(ROOT / "params.yaml"))
    ap.add_argument("--data", default=str(ROOT / "data" / "prepared"), help="prepared data (meta.json, train.bin, val.bin)")
    ap.add_argument("--staged-presets", type=names, default=None,
                    help="stage-0 presets, comma separated (default: staged.preset of params.yaml, and micro)")
    ap.add_argument("--cfg-presets", type=names, default=None, help="diffusion presets (default: micro); '' = none")
    ap.add_argument("--stages", type=names, default=["1", "2", "3", "plain"],
                    help="later stages timed beside each stage-0 row (1,2,3 and plain = mu.full false); '' = none")
    ap.add_argument("--threads", type=lambda s: [int(x) for x in s.split(",")], default=[1, 2],
                    help="intra-op thread counts, comma separated (default 1,2)")
    ap.add_argument("--precision", type=names, default=list(PRECISIONS), help="fp32,bf16 (default both)")
    ap.add_argument("--batch-size", type=int, default=None, help="default: train.batch_size")
    ap.add_argument("--seq-len", type=int, default=None, help="default: each preset's seq_len")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=10, help="timed steps per row")
    ap.add_argument("--matmul-size", type=int, default=2048)
    ap.add_argument("--matmul-repeats", type=int, default=5)
    ap.add_argument("--memory-presets", type=names, default=None,
                    help="presets of the peak-memory section (default micro; '' = skip)")
    ap.add_argument("--json", default=str(ROOT / DEFAULT_JSON))
    ap.add_argument("--quick", action="store_true", help="nano shapes, 1 warmup + 2 timed steps, no memory section")
    ap.add_argument("--equal-steps", type=int, default=0, metavar="N",
                    help="instead: train N steps in fp32 and in bf16 from the same seed, compare val loss")
    ap.add_argument("--equal-model", choices=("gpt", "stage0"), default="gpt")
    ap.add_argument("--equal-preset", default="micro")
    ap.add_argument("--equal-threads", type=int, default=0, help="default: one per core")
    ap.add_argument("--eval-batches", type=int, default=16, help="validation batches of --equal-steps")
    ap.add_argument("--equal-seed", type=int, default=None, help="--equal-steps seed (default: train.seed)")
    ap.add_argument("--noise-run", action="store_true",
                    help="--equal-steps: a third run, fp32 with the next seed, to size the seed-to-seed noise")
    ap.add_argument("--memory-child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    for p in args.precision:
        if p not in PRECISIONS:
            ap.error(f"--precision: {p!r} is not one of {PRECISIONS}")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.memory_child:
        memory_child(args.memory_child)
        return {}
    ctx = Context(args.params, args.data)
    threads_before = torch.get_num_threads()
    if args.quick:
        args.staged_presets = args.staged_presets or ["nano"]
        args.cfg_presets = args.cfg_presets if args.cfg_presets is not None else ["nano"]
        args.memory_presets = args.memory_presets or []
        args.batch_size = args.batch_size or 4
        args.warmup, args.steps = 1, 2
        args.matmul_size, args.matmul_repeats = 256, 2
    if args.staged_presets is None:
        args.staged_presets = list(dict.fromkeys([ctx.params.staged.preset, "micro"]))
    if args.cfg_presets is None:
        args.cfg_presets = ["micro"]
    if args.memory_presets is None:
        args.memory_presets = ["micro"]

    env = environment()
    report: dict = {"environment": env, "vocab_source": ctx.vocab_source, "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                    "loadavg_before": loadavg(), "args": {k: v for k, v in vars(args).items() if k != "memory_child"}}
    print(f"torch {env['torch']}, {env['cpu']}, {env['cpu_count']} cpus, capability {env['cpu_capability']}, "
          f"avx512_bf16={env['avx512_bf16']} amx_bf16={env['amx_bf16']} mkldnn_bf16={env['mkldnn_bf16']}")
    print(f"load average before: {report['loadavg_before']}")
    try:
        if args.equal_steps:
            print(f"\nfp32 vs bf16 autocast at {args.equal_steps} equal steps ({args.equal_model}/{args.equal_preset})")
            report["equal_steps"] = eq = equal_steps(ctx, args)
            print_equal(eq)
        else:
            run_speed(ctx, args, report)
    finally:
        torch.set_num_threads(threads_before)
    report["loadavg_after"] = loadavg()
    print(f"\nload average after: {report['loadavg_after']}")
    path = Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {path}")
    return report


def run_speed(ctx: Context, args, report: dict) -> None:
    print(f"\nmatmul peak ({args.matmul_size}x{args.matmul_size}, best of {args.matmul_repeats})")
    peaks = {str(t): matmul_peak(args.matmul_size, args.matmul_repeats, t) for t in args.threads}
    report["matmul_peak_gflops"] = peaks
    print_peak(peaks)

    run_memory(ctx, args, report)  # first: children then start from a small parent (see peak_memory)
    work = workloads(ctx, args)
    if not work:
        return
    print(f"\ntraining step (fwd + bwd + clip + AdamW foreach), batch {work[0].batch_size if work else '-'}, "
          f"{args.warmup} warmup + {args.steps} timed steps, tok/s from the median step")
    for w in work:
        print(f"  {w.name}: {w.shape.label()}")
    rows = []
    for threads in args.threads:
        for w in work:
            for precision in args.precision:
                rows.append(time_training(w, ctx, precision, threads, args.warmup, args.steps))
                r = rows[-1]
                print(f"  .. {w.name} {precision} {threads}thr: {r['step_s_median']:.3f} s/step", flush=True)
    report["training"] = rows
    print()
    print_training(rows, peaks)
    print()
    print_stages(rows)
    print()
    print_summary(rows)



def run_memory(ctx: Context, args, report: dict) -> None:
    mem = []
    b = args.batch_size or ctx.params.train.batch_size
    targets = []
    for preset in args.memory_presets:
        shape = ctx.shape(preset, args.seq_len)
        targets += [Workload(f"cfg/{preset}", "cfg", preset, shape, b), Workload(f"stage0/{preset}", "stage0", preset, shape, b),
                    Workload(f"gpt/{preset}", "gpt", preset, shape, b)]
    if targets:
        threads = max(args.threads)
        print(f"\npeak memory of 2 training steps, batch {b}, each in a fresh process (RSS, GiB)")
        for w in targets:
            for precision in args.precision:
                mem.append(peak_memory(w, args, precision, threads))
        print_memory(mem)
    report["memory"] = mem


if __name__ == "__main__":
    main()
