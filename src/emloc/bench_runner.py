"""The bench's stage runner (each CLI stage in a child process, artifacts cached under the report
folder) and the row it makes of an evaluation and the stages behind it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .artifacts import read_manifest
from .bench_report import EXTRA_METRICS
from .errors import EmlocError

if TYPE_CHECKING:
    from .bench import BenchConfig


class _Runner:
    """Runs CLI stages in child processes, caching their artifacts under `work`."""

    def __init__(self, work: Path, cfg: "BenchConfig") -> None:
        self.work, self.cfg = work, cfg
        self.env = dict(os.environ, TOKENIZERS_PARALLELISM="false")

    def cli(self, *args: str) -> None:
        p = subprocess.run([sys.executable, "-m", "emloc.cli", "-q", *args], capture_output=True, text=True, env=self.env)
        if p.returncode != 0:
            tail = (p.stderr.strip().splitlines() or ["(no output)"])[-1]
            raise EmlocError(f"bench stage `emloc {args[0]}` failed: {tail}")

    def dev(self, dtype: bool = True) -> list[str]:
        return ["--device", self.cfg.device] + (["--dtype", self.cfg.dtype] if dtype else [])

    def build(self, name: str, base: str, data: str, ratio: float, samples: int, *extra: str) -> Path:
        out = self.work / name
        if "--method" not in extra:  # the paper's SVD unless a row asks for another method
            extra = ("--method", "svd", *extra)
        if self.cfg.vocab_format != "keep" and extra[extra.index("--method") + 1] in ("svd", "quant", "svd+quant"):
            extra = (*extra, "--vocab-format", self.cfg.vocab_format)
        if read_manifest(out) is None:
            self.cli("build", "--base", base, "--calibration", data, "--output", str(out), "--ratio", str(ratio), "--samples",
                     str(samples), "--max-length", str(self.cfg.max_length), "--stats-dtype", self.cfg.stats_dtype, "--overwrite",
                     *extra, *self.dev())
        return out

    def train(self, name: str, model: str, data: str, eval_data: str | None, seed: int, *extra: str) -> Path:
        out = self.work / name
        c = self.cfg
        if c.gradient_checkpointing and "--gradient-checkpointing" not in extra:
            extra = (*extra, "--gradient-checkpointing")
        if read_manifest(out) is None:
            self.cli("train", "--model", model, "--data", data, *(["--eval-data", eval_data] if eval_data else []), "--output", str(out),
                     "--steps", str(c.steps), "--batch-size", str(c.batch_size), "--lr", str(c.lr), "--rank", str(c.rank),
                     "--alpha", str(c.alpha), "--max-length", str(c.max_length), "--eval-every", "0", "--eval-samples", "64",
                     "--seed", str(seed), "--overwrite", *self.resumable(), *extra, *self.dev())
        return out

    def resumable(self) -> list[str]:
        """A checkpoint every quarter of the steps and resume from it: a stopped bench does not retrain a row from step 0."""
        return ["--save-every", str(max(1, self.cfg.steps // 4)), "--resume"]

    def correct(self, name: str, adapter: Path, clamp: float | None, mode: str = "paper", *extra: str) -> Path:
        out = self.work / name
        if read_manifest(out) is None:
            self.cli("correct", "--adapter", str(adapter), "--output", str(out), "--mode", mode,
                     "--clamp", "none" if clamp is None else str(clamp), "--overwrite", *extra, *self.dev(dtype=False))
        return out

    def eval(self, name: str, model: str, eval_data: str, adapter: Path | None = None, *extra: str) -> dict[str, Any]:
        out = self.work / "eval" / f"{name}.json"
        if not out.is_file():
            args = ["eval", "--model", model, "--data", eval_data, "--output", str(out), "--max-length", str(self.cfg.max_length)]
            if adapter is not None:
                args += ["--adapter", str(adapter)]
            if self.cfg.eval_samples:
                args += ["--samples", str(self.cfg.eval_samples)]
            self.cli(*args, *extra, *self.dev())
        result = json.loads(out.read_text())
        if self.cfg.extra_eval:
            prior = self.work / "eval" / f"{name}.extra.json"
            if not prior.is_file():
                self.cli("eval", "--model", model, "--data", str(Path(eval_data).parent / self.cfg.extra_eval), "--output", str(prior),
                         *(["--adapter", str(adapter)] if adapter is not None else []), *self.dev())
            result["prior_loss"] = json.loads(prior.read_text())["loss"]
        if self.cfg.scorer:
            scores = self.work / "eval" / f"{name}.scores.json"
            if not scores.is_file():
                p = subprocess.run([sys.executable, "-m", self.cfg.scorer, "score", "--model", model, "--output", str(scores),
                                    "--grid", str(self.work / "eval" / f"{name}.png"),
                                    *(["--adapter", str(adapter)] if adapter is not None else [])],
                                   capture_output=True, text=True, env=self.env)
                if p.returncode != 0:
                    raise EmlocError(f"bench scorer {self.cfg.scorer} failed: {(p.stderr.strip().splitlines() or ['?'])[-1]}")
            result.update(json.loads(scores.read_text()))
        return result


def _row(method: str, ratio: float | None, seed: int, ev: dict[str, Any], **stages: Path | None) -> dict[str, Any]:
    # "nll" holds the evaluation's loss: answer NLL, or a denoiser's MSE (report["metric"] says which)
    row: dict[str, Any] = {"method": method, "ratio": ratio, "seed": seed, "nll": ev.get("loss", ev.get("nll")),
                           "exact_match": ev.get("exact_match"), "eval_peak_rss_mb": ev.get("peak_rss_mb"),
                           "eval_seconds": ev.get("wall_seconds")}
    row.update({k: ev[k] for k in EXTRA_METRICS if k in ev}, metric=ev.get("metric", "answer NLL"))
    for stage, folder in stages.items():
        m = read_manifest(folder) if folder is not None else None
        if not m:
            continue
        row[f"{stage}_peak_rss_mb"] = m.get("peak_rss_mb")
        row[f"{stage}_seconds"] = m.get("wall_seconds")
        if "peak_cuda_allocated_mb" in m:
            row[f"{stage}_peak_cuda_mb"] = m["peak_cuda_allocated_mb"]
        if stage == "train":
            row.update(trainable_params=m.get("trainable_params"), trained_model_params=m.get("model_params"),
                       trained_model_bytes=m.get("model_bytes"),
                       seconds_per_step=m.get("seconds_per_step"))
        if stage == "correct":
            row.update(clamped=m.get("clamped_directions"), directions=m.get("directions"))
        if stage == "build" and m.get("bytes"):
            row["bytes_fraction"] = m["bytes"]["fraction"]
    return row
