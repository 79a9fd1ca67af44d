"""DVC stage `prepare`: corpus -> tokenizer -> uint16 token files + prompt/text pairs."""

from __future__ import annotations

import shutil
import time

from pipeline.common import log, open_stage, write_json, write_stage_record


def run() -> None:
    from sunfish.data.prepare import prepare_corpus

    ctx = open_stage("prepare")
    p = ctx.params
    out = ctx.prepared
    with ctx.tracking(ctx.flat_params("data", "tokenizer")) as run:
        start = time.perf_counter()
        tmp = out.with_name(out.name + ".tmp")
        if tmp.exists():
            shutil.rmtree(tmp)
        # every staged model trains on windows of seq_len + 1 tokens (the diffusion model on pairs)
        window = p.training_for("stage_0").seq_len + 1
        try:
            meta = prepare_corpus(p.data, p.tokenizer, tmp, ctx.corpora, min_train_tokens=window)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)  # a failed prepare leaves data/prepared as it was
            raise
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
        seconds = time.perf_counter() - start
        metrics = {
            "documents_train": meta["splits"]["train"]["documents"],
            "documents_val": meta["splits"]["val"]["documents"],
            "tokens_train": meta["splits"]["train"]["tokens"],
            "tokens_val": meta["splits"]["val"]["tokens"],
            "bytes_per_token": meta["splits"]["train"]["bytes_per_token"],
            "pairs_train": meta["pairs"]["train"],
            "pairs_val": meta["pairs"]["val"],
            "vocab_size": meta["vocab_size"],
            "seconds": seconds,
        }
        run.log_metrics(metrics)
        run.log_artifact(out / "meta.json")
        write_stage_record(ctx.reports, "prepare", {**metrics, "mlflow_run_id": run.run_id})
        log.info(
            "prepared %s: %d/%d documents, %d/%d tokens (train/val), %d pairs, %.1fs",
            meta["source"], metrics["documents_train"], metrics["documents_val"],
            metrics["tokens_train"], metrics["tokens_val"], metrics["pairs_train"], seconds,
        )
