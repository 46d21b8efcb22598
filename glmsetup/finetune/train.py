"""The training run: data, model, method, optimizer, checkpoints, resume, Ctrl-C.

Defaults follow ptuning/train.sh and the transformers Trainer it runs: batch 1 x 16 accumulated
micro-batches per optimizer step, AdamW (weight decay 0), learning rate decaying linearly to 0,
gradients clipped to norm 1.0, seed 42, max_source_length 64, max_target_length 128, gradient
checkpointing on. Examples are shuffled per epoch from the seed, so a resumed run sees the same
order.

The output folder:
  finetune.json          the run: settings, data hash, status, step, per-step losses (written first)
  checkpoint-N/          every --save-steps, at Ctrl-C and at the end: the method's files (loadable as
                         they are) plus training_state.pt (optimizer, schedule, RNG, data position)
  pytorch_model.bin, config.json            (ptuning: the official checkpoint, at the end)
  adapter_config.json, adapter_model.safetensors   (lora: peft's adapter, at the end)
Every file is written beside its place and renamed into it, a checkpoint folder likewise, so an
interrupted write leaves the previous state intact. Running the same command again continues from
the last checkpoint; a finished run is reported, not repeated (raise --steps to train further).
"""
from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional

from glmsetup.errors import Interrupted, LockedError, UsageError

STATE_FILE = "finetune.json"
TRAINING_STATE = "training_state.pt"
FORMAT = "glmsetup-finetune/1"
MAX_GRAD_NORM = 1.0
# Settings that must match to continue a run (steps and epochs may grow, the profile may change).
RESUME_KEYS = ("method", "prompt_column", "response_column", "history_column", "pre_seq_len", "prefix_projection",
               "lora_rank", "lora_alpha", "lora_dropout", "lora_targets", "learning_rate", "batch_size",
               "grad_accum", "max_source_length", "max_target_length", "seed", "max_samples")


@dataclass
class Settings:
    method: str
    data: str
    model: str
    output: str
    prompt_column: str = "content"
    response_column: str = "summary"
    history_column: Optional[str] = None
    eval: Optional[str] = None
    profile: str = "auto"
    steps: Optional[int] = None
    epochs: Optional[float] = None
    pre_seq_len: int = 128
    prefix_projection: bool = False
    lora_rank: int = 8
    lora_alpha: float = 32.0
    lora_dropout: float = 0.1
    lora_targets: tuple = ("q_proj", "k_proj", "v_proj")
    learning_rate: Optional[float] = None
    batch_size: int = 1
    grad_accum: int = 16
    max_source_length: int = 64
    max_target_length: int = 128
    save_steps: int = 500
    seed: int = 42
    max_samples: Optional[int] = None
    gradient_checkpointing: bool = True

    def __post_init__(self):
        if self.learning_rate is None:
            self.learning_rate = 2e-2 if self.method == "ptuning" else 2e-4  # train.sh's LR for P-tuning
        self.lora_targets = tuple(self.lora_targets)

    def fingerprint(self) -> dict:
        d = asdict(self)
        d["lora_targets"] = list(self.lora_targets)
        return {k: d[k] for k in RESUME_KEYS}


@dataclass
class RunState:
    step: int = 0
    epoch: int = 0
    position: int = 0  # examples of this epoch's order already used
    losses: list = field(default_factory=list)


# -- the output folder ------------------------------------------------------------------------------

def _read_state(out: Path) -> Optional[dict]:
    path = out / STATE_FILE
    if not path.is_file():
        return None
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise UsageError(f"{path} cannot be read ({exc})", hint="choose a new --output folder") from exc
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise UsageError(f"{path} is not a glmsetup finetune record", hint="choose a new --output folder")
    return doc


def check_output(settings: Settings) -> tuple[Path, Optional[dict]]:
    """The output folder and the run recorded there (None for a new run); refuses foreign folders."""
    out = Path(settings.output).expanduser()
    if out.exists() and not out.is_dir():
        raise UsageError(f"--output {out} is a file", hint="pass a folder (it is created if missing)")
    doc = _read_state(out) if out.is_dir() else None
    if doc is None and out.is_dir() and any(p.name != ".glmsetup" for p in out.iterdir()):
        raise UsageError(f"--output {out} is not empty and holds no glmsetup finetune run",
                         hint="choose a new or empty folder; nothing was written")
    if doc is not None:
        before = doc.get("settings", {})
        changed = [k for k in RESUME_KEYS if before.get(k) != settings.fingerprint()[k]]
        if changed:
            k = changed[0]
            raise UsageError(f"{out} holds a run with {k} = {before.get(k)!r}, this command asks for "
                             f"{settings.fingerprint()[k]!r}",
                             hint="run the same command to continue it, or choose a new --output folder")
    return out, doc


def _atomic_json(path: Path, doc: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(doc, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def latest_checkpoint(out: Path) -> Optional[Path]:
    found = []
    for p in out.glob("checkpoint-*"):
        tail = p.name.split("-", 1)[1]
        if p.is_dir() and tail.isdigit() and (p / TRAINING_STATE).is_file():
            found.append((int(tail), p))
    return max(found)[1] if found else None


# -- the run ----------------------------------------------------------------------------------------

class Trainer:
    def __init__(self, settings: Settings, progress: Optional[Callable] = None):
        self.s = settings
        self.progress = progress or (lambda **kw: None)

    def prepare(self) -> None:
        """Everything that can be refused, in the order a user wants the errors; then the model."""
        from glmsetup.finetune import data
        from glmsetup.runtime.checkpoint import open_checkpoint
        from glmsetup.runtime.tokenizer import ChatGLM2Tokenizer

        s = self.s
        self.out, self.record = check_output(s)
        ckpt = open_checkpoint(Path(s.model).expanduser())
        self.base_raw = ckpt.raw_config if ckpt.official else None
        self.tokenizer = ChatGLM2Tokenizer(ckpt.path / "tokenizer.model")
        cols = data.Columns(s.prompt_column, s.response_column, s.history_column)
        lengths = dict(max_source_length=s.max_source_length, max_target_length=s.max_target_length)
        self.train_set = data.load(s.data, self.tokenizer, cols, max_samples=s.max_samples, **lengths)
        self.eval_set = data.load(s.eval, self.tokenizer, cols, **lengths) if s.eval else None
        if self.record is not None and self.record.get("data_sha256") != self.train_set.sha256:
            raise UsageError(f"{s.data} changed since the run in {self.out} began",
                             hint="train on the changed data in a new --output folder")
        per_step = s.batch_size * s.grad_accum
        self.total = s.steps if s.steps else max(1, math.ceil((s.epochs or 1) * len(self.train_set) / per_step))

    def load_model(self) -> None:
        import torch

        import glmsetup
        from glmsetup.finetune import forward

        s = self.s
        torch.manual_seed(s.seed)
        self.tokenizer, self.model = glmsetup.load_chat_model(Path(s.model).expanduser(), profile=s.profile)
        if s.method == "ptuning":
            from glmsetup.finetune.ptuning import PrefixTuning

            forward.frozen_quantized_grads(self.model)
            self.method = PrefixTuning(self.model, s.pre_seq_len, s.prefix_projection, self.base_raw)
        else:
            from glmsetup.finetune.lora import LoraTuning

            self.method = LoraTuning(self.model, s.lora_rank, s.lora_alpha, s.lora_dropout, s.lora_targets,
                                     str(Path(s.model).expanduser()))
        params = self.method.parameters()
        self.optimizer = torch.optim.AdamW(params, lr=s.learning_rate, weight_decay=0.0)
        total = self.total
        self.schedule = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda n: max(0.0, 1 - n / total))

    # -- data order ---------------------------------------------------------------------------------
    def _order(self, epoch: int) -> list:
        import torch

        g = torch.Generator().manual_seed(self.s.seed + epoch)
        return torch.randperm(len(self.train_set), generator=g).tolist()

    def _next_indices(self, st: RunState) -> list:
        out = []
        while len(out) < self.s.batch_size:
            order = self._order(st.epoch)
            take = order[st.position:st.position + self.s.batch_size - len(out)]
            out += take
            st.position += len(take)
            if st.position >= len(order):
                st.epoch, st.position = st.epoch + 1, 0
        return out

    # -- one optimizer step ---------------------------------------------------------------------------
    def _micro_loss(self, indices, training: bool, dataset=None):
        from glmsetup.finetune import data, forward

        ds = dataset or self.train_set
        ids, labels = data.batch(ds, indices, self.tokenizer.eos_token_id, self.tokenizer.pad_token_id,
                                 self.s.max_source_length, self.s.max_target_length)
        prefix = self.method.prefix(len(indices))
        return forward.loss(self.model, ids, labels, prefix,
                            checkpointing=training and self.s.gradient_checkpointing)

    def step(self, st: RunState) -> float:
        import torch

        self.method.train(True)
        total = 0.0
        for _ in range(self.s.grad_accum):
            loss = self._micro_loss(self._next_indices(st), True) / self.s.grad_accum
            loss.backward()
            total += float(loss.detach())
        torch.nn.utils.clip_grad_norm_(self.method.parameters(), MAX_GRAD_NORM)
        self.optimizer.step()
        self.schedule.step()
        self.optimizer.zero_grad(set_to_none=True)
        st.step += 1
        st.losses.append(round(total, 6))
        return total

    def evaluate(self) -> Optional[float]:
        """Mean loss over the eval set (no dropout), batch by batch; None without --eval."""
        import torch

        if self.eval_set is None:
            return None
        self.method.train(False)
        total, count = 0.0, 0
        with torch.no_grad():
            for start in range(0, len(self.eval_set), self.s.batch_size):
                idx = list(range(start, min(start + self.s.batch_size, len(self.eval_set))))
                total += float(self._micro_loss(idx, False, self.eval_set)) * len(idx)
                count += len(idx)
        return round(total / count, 6)

    # -- saving and resuming --------------------------------------------------------------------------
    def save_checkpoint(self, st: RunState) -> Path:
        import torch

        target = self.out / f"checkpoint-{st.step}"
        tmp = self.out / f".checkpoint-{st.step}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        self.method.save(tmp)
        state = {"method": self.method.state_dict(), "optimizer": self.optimizer.state_dict(),
                 "schedule": self.schedule.state_dict(), "run": asdict(st), "rng": torch.get_rng_state()}
        torch.save(state, tmp / TRAINING_STATE)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
        return target

    def resume(self) -> RunState:
        import torch

        last = latest_checkpoint(self.out)
        if last is None:
            return RunState()
        state = torch.load(last / TRAINING_STATE, map_location="cpu", weights_only=True)
        self.method.load_state_dict(state["method"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.schedule.load_state_dict(state["schedule"])
        torch.set_rng_state(state["rng"])
        return RunState(**state["run"])

    def write_record(self, st: RunState, status: str, extra: Optional[dict] = None) -> dict:
        doc = dict(self.record or {})
        doc.update({"format": FORMAT, "status": status, "settings": self.s.fingerprint(),
                    "data": str(Path(self.s.data).expanduser()), "data_sha256": self.train_set.sha256,
                    "model": str(Path(self.s.model).expanduser()), "step": st.step, "total_steps": self.total,
                    "losses": list(st.losses)})
        doc.update(extra or {})
        _atomic_json(self.out / STATE_FILE, doc)
        self.record = doc
        return doc

    def finish(self, st: RunState) -> list:
        """The method's files into the output folder itself, each renamed into place."""
        tmp = self.out / ".final.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        names = self.method.save(tmp)
        for name in names:
            os.replace(tmp / name, self.out / name)
        shutil.rmtree(tmp, ignore_errors=True)
        return names

    # -- all of it ------------------------------------------------------------------------------------
    def run(self) -> dict:
        from glmsetup.fetch.guard import FolderLock

        self.prepare()
        self.out.mkdir(parents=True, exist_ok=True)
        try:
            lock = FolderLock(self.out / ".glmsetup")
            lock.__enter__()
        except LockedError:
            raise LockedError(f"another glmsetup finetune is writing to {self.out}",
                              hint="wait for it to finish, or stop it") from None
        try:
            return self._run_locked()
        finally:
            lock.__exit__(None, None, None)

    def _run_locked(self) -> dict:
        done = self.record is not None and self.record.get("status") == "done" and \
            self.record.get("step", 0) >= self.total
        if done:
            return self.result(self.record, resumed=True, trained=0)
        self.load_model()
        st = self.resume()
        resumed_from = st.step
        extra = {}
        if st.step == 0 and self.eval_set is not None:
            extra["eval_loss_start"] = self.evaluate()
        self.write_record(st, "running", extra)
        started = time.monotonic()
        self.progress(step=st.step, total=self.total, loss=None, started=started, first=resumed_from)
        try:
            while st.step < self.total:
                loss = self.step(st)
                self.progress(step=st.step, total=self.total, loss=loss, started=started, first=resumed_from)
                if st.step % self.s.save_steps == 0 and st.step < self.total:
                    self.save_checkpoint(st)
                    self.write_record(st, "running")
        except KeyboardInterrupt:
            if st.step > resumed_from:
                self.save_checkpoint(st)
            self.write_record(st, "interrupted")
            raise Interrupted(f"stopped at step {st.step} of {self.total}; saved in {self.out}",
                              hint="run the same command again to continue from there") from None
        self.save_checkpoint(st)
        files = self.finish(st)
        extra = {"files": files, "eval_loss": self.evaluate()}
        doc = self.write_record(st, "done", extra)
        return self.result(doc, resumed=resumed_from > 0, trained=st.step - resumed_from)

    def result(self, doc: dict, *, resumed: bool, trained: int) -> dict:
        losses = doc.get("losses") or []
        option = "--ptuning-checkpoint" if self.s.method == "ptuning" else "--adapter"
        return {
            "method": self.s.method, "output": str(self.out), "model": doc.get("model"),
            "steps": doc.get("step"), "total_steps": doc.get("total_steps"), "trained_steps": trained,
            "resumed": resumed, "examples": len(self.train_set), "skipped_examples": self.train_set.skipped,
            "first_loss": losses[0] if losses else None, "last_loss": losses[-1] if losses else None,
            "eval_loss_start": doc.get("eval_loss_start"), "eval_loss": doc.get("eval_loss"),
            "files": doc.get("files", []), "settings": doc.get("settings"),
            "serve": f"glmsetup run web --model {doc.get('model')} {option} {self.out}",
        }


def train(settings: Settings, progress: Optional[Callable] = None) -> dict:
    return Trainer(settings, progress).run()
