"""Sampling-speed benchmark: the diffusion model's samplers against KV-cached AR generation.

Prints figures; it checks nothing (no thresholds). See benchmarks/README.md for how to read them.

    python benchmarks/bench_sampling.py                       # cfg.preset of params.yaml, default num_steps
    python benchmarks/bench_sampling.py --quick               # nano, few steps (seconds)
    python benchmarks/bench_sampling.py --cfg-checkpoint models/cfg/final \\
        --ar-checkpoint models/stage_0/final     # trained models, judged by the n-gram judge

Sections of one run:

1. sampling: tokens/s of ``sunfish.diffusion.sample`` for each objective (masked, continuous) and
   scheduler (ddim, ddpm) at ``sampling.num_steps`` and ``sampling.guidance_scale`` (w > 1 runs the
   conditional and unconditional branches as one batch of 2N), for one sample at a time (what
   ``sunfish sample`` does) and for ``--num-samples`` at once (what evaluate does); against
   KV-cached AR generation (``sunfish.generation.generate_batch``, the same float64 nucleus
   ``sampling.top_p`` and draw) of a stage-0 StagedLM of the same width and depth, batched the same way
   (an AR row per batch size: "vs AR" divides by the AR row of the same batch), for the same number
   of tokens. Without checkpoints the models are freshly initialised: the timing is the same, the
   text is noise.
2. judge: the samples of each trained row judged by the n-gram judge that evaluate uses
   (sunfish.evaluation.judge: fitted on the prepared train pairs, calibrated on the validation
   texts, independent of every model timed here), so speed can be read at matched fluency. Rows
   from untrained models are not judged; ``--no-judge`` skips it.
3. training: tokens/s of one training step (bench_train.time_training) of the denoiser and of the
   AR stage 0 at the same preset, train.batch_size and train.seq_len.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from anywhere: import sunfish from the checkout
    sys.path.insert(0, str(ROOT))

DEFAULT_JSON = "reports/benchmarks/sampling.json"
OBJECTIVES = ("masked", "continuous")
SCHEDULERS = ("ddim", "ddpm")


def bench_train_module():
    """benchmarks/bench_train.py as a module (benchmarks/ is not a package)."""
    name = "bench_train"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name("bench_train.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses resolve their module by name
    spec.loader.exec_module(module)
    return module


def _load(path: str | None, kind: str):
    """(model, tokenizer) from a checkpoint, or None when no path was given."""
    if not path:
        return None
    from sunfish.training.checkpoint import load_checkpoint, load_tokenizer_for

    model, meta, directory = load_checkpoint(Path(path))
    if model.kind != kind:
        raise SystemExit(f"{path} is a {model.kind} checkpoint; expected {kind}")
    return model, load_tokenizer_for(directory, meta)


def _decode(tok, ids: list[int]) -> str:
    if tok is None:
        return ""
    if tok.eos_id in ids:
        ids = ids[: ids.index(tok.eos_id)]
    return tok.decode([t for t in ids if t != tok.pad_id])


def diffusion_model(ctx, preset: str, objective: str, trained):
    """The trained diffusion model when its objective is ``objective``, else a fresh one of the preset."""
    if trained is not None and trained[0].config.objective == objective:
        return trained[0], True
    from sunfish.models.denoiser import DiffusionConfig, DiffusionLM

    p = ctx.params
    cfg = p.cfg.model_copy(update={"objective": objective})
    config = DiffusionConfig.from_params(cfg, p.presets[preset], ctx.vocab_size, pad_id=ctx.pad_id, eos_id=ctx.eos_id)
    torch.manual_seed(0)
    return DiffusionLM(config), False


def ar_model(ctx, preset: str, trained):
    if trained is not None:
        return trained[0], True
    from sunfish.models.staged import StagedLM, StagedLMConfig

    config = StagedLMConfig.from_params(ctx.params.staged, ctx.params.presets[preset], vocab_size=ctx.vocab_size,
                                        stage=0, eos_id=ctx.eos_id)
    torch.manual_seed(0)
    return StagedLM(config), False


def _prompts(tok, n: int, data_dir: Path, max_tokens: int) -> list[list[int]]:
    """Held-out prompts (pairs_val.jsonl) when there is a tokenizer, else short fixed id lists."""
    path = data_dir / "pairs_val.jsonl"
    if tok is not None and path.exists():
        from sunfish.data.prompts import spread_over_documents

        lines = path.read_text(encoding="utf-8").splitlines()
        records = spread_over_documents([json.loads(line) for line in lines if line.strip()], n)
        if records:
            return [tok.encode_prompt(r["prompt"])[:max_tokens] for r in records]
    return [[2 + (i % 7), 3, 4 + i % 5] for i in range(n)]


def time_diffusion(model, prompts, *, batch: int, count: int, seq_len: int, num_steps: int, w: float,
                   scheduler: str, eta: float, repeats: int, top_p: float = 1.0, guidance: str = "token",
                   candidates: int = 4) -> tuple[float, list[list[int]]]:
    """(median seconds for ``count`` samples drawn ``batch`` at a time, the ids of the last repeat)."""
    from sunfish.diffusion.sample import sample

    times, ids = [], []
    for _ in range(repeats):
        ids = []
        start = time.perf_counter()
        for first in range(0, count, batch):
            rows = prompts[first: first + batch]
            gen = torch.Generator().manual_seed(first)
            out = sample(model, rows, num_samples=len(rows), seq_len=seq_len, num_steps=num_steps,
                         guidance_scale=w, scheduler=scheduler, eta=eta, generator=gen, top_p=top_p,
                         guidance=guidance, candidates=candidates)
            ids += out.tolist()
        times.append(time.perf_counter() - start)
    return statistics.median(times), ids


def guidance_for(model, configured: str) -> str:
    from sunfish.sampling import default_guidance

    return default_guidance(model, configured)


def time_ar(model, ev, *, batch: int, count: int, seq_len: int, eos_id: int, top_p: float,
            repeats: int) -> tuple[float, list[list[int]]]:
    """KV-cached generation of ``count`` sequences of ``seq_len`` new tokens, ``batch`` at a time (no early stop)."""
    from sunfish.generation import generate_batch

    times, ids = [], []
    for _ in range(repeats):
        ids = []
        start = time.perf_counter()
        for first in range(0, count, batch):
            gen = torch.Generator().manual_seed(first)
            out = generate_batch(model, [eos_id], num_samples=min(batch, count - first), max_new_tokens=seq_len,
                                 top_p=top_p, generator=gen)
            ids += out.tolist()
        times.append(time.perf_counter() - start)
    return statistics.median(times), ids


def fit_ngram_judge(data_dir: Path, fluency, seed: int):
    """evaluate's judge over the prepared pairs: (judge, calibration), or None without them."""
    from sunfish.data.dataset import load_pairs
    from sunfish.evaluation.judge import fit_judge

    train, val = data_dir / "pairs_train.jsonl", data_dir / "pairs_val.jsonl"
    if not (train.exists() and val.exists()):
        return None
    texts = lambda path: list(dict.fromkeys(r["text"] for r in load_pairs(path)))  # noqa: E731
    judge, cal, _ = fit_judge(texts(train), texts(val), order=fluency.judge_order, max_words=fluency.max_words,
                              seed=seed)
    return judge, cal


def judged(judge, texts: list[str]) -> dict:
    """{"judge_ppl", "fluent_share"} of ``texts``, None figures without a judge."""
    if judge is None:
        return {"judge_ppl": None, "fluent_share": None}
    from sunfish.evaluation.judge import judge_samples

    got = judge_samples(texts, *judge)
    return {"judge_ppl": got["judge_ppl"], "fluent_share": got["fluent_share"]}


def run_sampling(ctx, args, report: dict) -> None:
    p = ctx.params
    bt = bench_train_module()
    trained_cfg = _load(args.cfg_checkpoint, "diffusion")
    trained_ar = _load(args.ar_checkpoint, "staged")
    tok = (trained_cfg or trained_ar or (None, None))[1]
    if tok is None and (ctx.data_dir / "tokenizer.json").exists():
        from sunfish.data.tokenizer import TextTokenizer

        tok = TextTokenizer.load(ctx.data_dir / "tokenizer.json")
    judge = None
    if not args.no_judge and (trained_cfg or trained_ar) and tok is not None:
        judge = fit_ngram_judge(ctx.data_dir, p.eval.fluency, p.eval.seed)
    preset = args.preset
    seq_len, steps, count = args.seq_len, args.num_steps, args.num_samples
    batches = list(dict.fromkeys([1, count]))
    w = args.guidance_scale
    rows: list[dict] = []
    ar_tps: dict[int, float] = {}
    ar, ar_trained = ar_model(ctx, preset, trained_ar)
    for batch in batches:
        with bt.OtherLoad() as other:
            seconds, ids = time_ar(ar, p.eval, batch=batch, count=count, seq_len=seq_len, eos_id=ctx.eos_id,
                                   top_p=p.sampling.top_p, repeats=args.repeats)
        texts = [_decode(tok, r) for r in ids]
        ar_tps[batch] = count * seq_len / seconds
        rows.append({"name": f"ar/kv-cache/b{batch}", "objective": "autoregressive", "scheduler": "-", "batch": batch,
                     "trained": ar_trained, "seconds": seconds, "tokens_per_s": ar_tps[batch], "vs_ar": 1.0,
                     **judged(judge if ar_trained else None, texts), "example": texts[0][:120],
                     "other_cores": other.cores})
    for objective in OBJECTIVES:
        model, trained = diffusion_model(ctx, preset, objective, trained_cfg)
        prompts = _prompts(tok if trained or tok is not None else None, count, ctx.data_dir,
                           model.config.max_prompt_tokens)
        for scheduler in SCHEDULERS:
            for batch in batches:
                with bt.OtherLoad() as other:
                    seconds, ids = time_diffusion(model, prompts, batch=batch, count=count, seq_len=seq_len,
                                                  num_steps=steps, w=w, scheduler=scheduler, eta=p.sampling.eta,
                                                  repeats=args.repeats, top_p=p.sampling.top_p,
                                                  guidance=guidance_for(model, args.guidance),
                                                  candidates=p.sampling.guidance_candidates)
                texts = [_decode(tok, r) for r in ids]
                tps = count * seq_len / seconds
                rows.append({"name": f"{objective}/{scheduler}/b{batch}", "objective": objective,
                             "scheduler": scheduler, "batch": batch, "trained": trained, "seconds": seconds,
                             "tokens_per_s": tps, "vs_ar": tps / ar_tps[batch],
                             **judged(judge if trained else None, texts),
                             "example": texts[0][:120], "other_cores": other.cores})
    report["sampling"] = {"preset": preset, "seq_len": seq_len, "num_steps": steps, "guidance_scale": w,
                          "guidance": args.guidance, "candidates": p.sampling.guidance_candidates,
                          "num_samples": count, "judge": "ngram" if judge else None, "rows": rows}
    print(f"\nsampling: preset {preset}, {count} samples x {seq_len} tokens, num_steps {steps}, guidance {w:g} "
          f"({args.guidance}, {p.sampling.guidance_candidates} candidates where sequence), "
          f"{torch.get_num_threads()} thread(s); vs AR: against the AR row of the same batch size")
    pct = lambda x: "-" if x is None else f"{100 * x:.0f}%"  # noqa: E731
    table_rows = [[r["name"], "yes" if r["trained"] else "no", f"{r['seconds']:.2f}", f"{r['tokens_per_s']:,.0f}",
                   f"{r['vs_ar']:.2f}x", "-" if r["judge_ppl"] is None else f"{r['judge_ppl']:.1f}",
                   pct(r["fluent_share"]), bt._cores(r["other_cores"])] for r in rows]
    print(bt.table(["row", "trained", "seconds", "tokens/s", "vs AR", "judge ppl", "fluent", "other load"],
                   table_rows, right={2, 3, 4, 5, 6}))


def run_training(ctx, args, report: dict) -> None:
    bt = bench_train_module()
    shape = ctx.shape(args.preset, args.train_seq_len)
    batch = args.train_batch_size
    rows = []
    for model in ("cfg", "stage0"):
        w = bt.Workload(f"{model}/{args.preset}", model, args.preset, shape, batch)
        rows.append(bt.time_training(w, ctx, args.precision, torch.get_num_threads(), args.train_warmup,
                                     args.train_steps))
    report["training"] = rows
    ratio = rows[0]["tokens_per_s"] / rows[1]["tokens_per_s"]
    print(f"\ntraining: {shape.label()}, batch {batch}, {args.precision}, {torch.get_num_threads()} thread(s)")
    print(bt.table(["row", "step s (median)", "tokens/s", "other load"],
                   [[r["name"], f"{r['step_s_median']:.3f}", f"{r['tokens_per_s']:,.0f}", bt._cores(r["other_cores"])]
                    for r in rows], right={1, 2}))
    print(f"denoiser / AR stage 0 training tokens/s: {ratio:.2f}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default=str(ROOT / "params.yaml"))
    ap.add_argument("--data", default=str(ROOT / "data" / "prepared"), help="prepared data (meta.json, pairs_val.jsonl)")
    ap.add_argument("--preset", default=None, help="shape of the untrained models (default: cfg.preset)")
    ap.add_argument("--cfg-checkpoint", default=None, help="a trained diffusion checkpoint (replaces its objective's rows)")
    ap.add_argument("--ar-checkpoint", default=None, help="a trained AR checkpoint for the KV-cache row")
    ap.add_argument("--no-judge", action="store_true",
                    help="skip the n-gram judge of the trained rows (it is fitted on --data's prepared pairs)")
    ap.add_argument("--num-samples", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=None, help="tokens per sample (default: eval.cfg_seq_len)")
    ap.add_argument("--num-steps", type=int, default=None, help="default: sampling.num_steps")
    ap.add_argument("--guidance-scale", type=float, default=None, help="default: sampling.guidance_scale")
    ap.add_argument("--guidance", choices=("sequence", "token"), default=None,
                    help="default: sampling.guidance (sequence applies to the masked objective only)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=1, help="timed repeats per row (the median is reported)")
    ap.add_argument("--precision", choices=("fp32", "bf16"), default="fp32", help="training section")
    ap.add_argument("--train-batch-size", type=int, default=None, help="default: train.batch_size")
    ap.add_argument("--train-seq-len", type=int, default=None, help="default: train.seq_len")
    ap.add_argument("--train-warmup", type=int, default=2)
    ap.add_argument("--train-steps", type=int, default=5)
    ap.add_argument("--no-training", action="store_true", help="skip the training section")
    ap.add_argument("--quick", action="store_true", help="nano, 2 samples of 16 tokens, 4 steps, 1 training step")
    ap.add_argument("--json", default=str(ROOT / DEFAULT_JSON))
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    bt = bench_train_module()
    ctx = bt.Context(args.params, args.data)
    p = ctx.params
    if args.quick:
        args.preset = args.preset or "nano"
        args.num_samples, args.seq_len, args.num_steps = 2, args.seq_len or 16, args.num_steps or 4
        args.train_batch_size, args.train_seq_len = args.train_batch_size or 2, args.train_seq_len or 16
        args.train_warmup, args.train_steps = 1, 1
    args.preset = args.preset or p.cfg.preset
    if args.preset not in p.presets:
        raise SystemExit(f"unknown preset {args.preset!r}; params.yaml has {sorted(p.presets)}")
    args.seq_len = args.seq_len or p.eval.cfg_seq_len
    args.num_steps = args.num_steps or p.sampling.num_steps
    args.guidance_scale = p.sampling.guidance_scale if args.guidance_scale is None else args.guidance_scale
    args.guidance = args.guidance or p.sampling.guidance
    args.train_batch_size = args.train_batch_size or p.train.batch_size
    args.train_seq_len = args.train_seq_len or p.train.seq_len
    threads_before = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    report: dict = {"environment": bt.environment(), "loadavg_before": bt.loadavg(), "args": vars(args)}
    print(f"load average before: {report['loadavg_before']}")
    try:
        run_sampling(ctx, args, report)
        if not args.no_training:
            run_training(ctx, args, report)
    finally:
        torch.set_num_threads(threads_before)
    report["loadavg_after"] = bt.loadavg()
    print(f"\nload average after: {report['loadavg_after']}")
    path = Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2, default=str) + "\n", encoding="utf-8")
    print(f"wrote {path}")
    return report


if __name__ == "__main__":
    main()
