"""One configuration object for ``tools/distill.py``; the command line overrides its fields.

Every field is a command-line option (``--teacher-steps 48``; booleans as ``--flag`` / ``--no-flag``),
and every run writes the resolved object to ``RUN/config.json`` so ``--resume RUN`` and
:func:`vdit_compile.distill.load_run` rebuild exactly what was trained.  Defaults are chosen for the
embedded default model and are explained next to each field (and in docs/distill/README.md).
"""
from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Optional

STAGES = ("mlcd", "masks", "kd")


class DistillConfigError(ValueError):
    """A configuration or input problem found before any training starts."""


@dataclass
class DistillConfig:
    # --- what to distil -------------------------------------------------------------------------
    model: str = "embedded"                 # "embedded", "tiny" (tests), or any vdit_compile.models.spec spec
    out: str = "runs/fewstep"               # run directory (refused if it exists, unless --overwrite)
    prompts: Optional[str] = None           # text file, one prompt a line; None: the model's own prompt generator
    plan: Optional[str] = None              # a saved plan: the masks stage applies it instead of calibrating
    stages: str = "mlcd,masks,kd"           # comma-separated subset of mlcd, masks, kd (in this order)
    # --- the trajectory being distilled ------------------------------------------------------------
    teacher_steps: int = 48                 # N: the teacher's Euler steps; 48 is divisible by 2, 3, 4, 6, 8, 12, 16, 24
    segments: int = 4                       # S: the student samples in S steps (and 2S, see sample_steps)
    guidance_scale: Optional[float] = None  # CFG scale of the teacher (baked into the student); None: the model's default
    student_cfg: bool = False               # the student guides itself like the teacher (2 branches a step, batched)
                                            # instead of baking CFG in: it starts as the teacher's plain Euler sampler
    pool_size: int = 256                    # teacher trajectories (prompt, noise) precomputed with CFG
    # --- optimisation -----------------------------------------------------------------------------
    batch_size: int = 32                    # global batch (split over DDP ranks)
    mlcd_steps: int = 1000                  # 0: as many as --mlcd-max-minutes holds (fitted once from the step rate)
    kd_steps: int = 400                     # 0: as many as --kd-max-minutes holds
    lr: float = 1e-4
    kd_lr: float = 5e-5
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    warmup_steps: int = 50
    lr_decay: str = "none"                  # after warm-up: "none" (constant), "cosine" or "linear" to 0 at the stage's steps
    mlcd_max_minutes: float = 0.0           # >0: end the stage early after this much training time (recorded)
    kd_max_minutes: float = 0.0
    loss: str = "pseudo_huber"              # "pseudo_huber" (robust, iCT-style) or "mse"
    huber_c: float = 0.03                   # pseudo-Huber knee, in RMS velocity units
    skip: int = 1                           # consistency target: teacher steps taken before the EMA target jumps
    anchor_weight: float = 1.0              # weight of the direct regression onto the teacher's segment end
    consistency_weight: float = 1.0         # weight of the consistency term (0: regression only, no target-network pass)
    visited_fraction: float = 0.5           # share of each batch drawn at the indices the S/2S-step samplers visit
    target_decay: float = 0.9               # EMA decay of the consistency target network
    ema_decay: float = 0.99                 # EMA decay of the exported weights
    # --- masks stage ------------------------------------------------------------------------------
    calib_prompts: int = 8                  # prompts whose few-step sampling feeds the calibration
    error_budget: Optional[float] = None    # None: the core's DEFAULT_ERROR_BUDGET
    max_density: Optional[float] = None
    kd_backend: str = "eager"               # optimize() backend for the KD student ("eager": no inductor compile in training)
    # --- engineering ------------------------------------------------------------------------------
    device: str = "auto"                    # auto: cuda if available else cpu
    precision: str = "auto"                 # auto: bf16 autocast on cuda, fp32 on cpu; or "fp32" / "bf16"
    grad_checkpointing: bool = False
    compile: bool = False                   # torch.compile the dense student (GPU; off in tests)
    seed: int = 0
    ckpt_every: int = 200                   # steps between checkpoints (also on SIGINT/SIGTERM and stage end)
    keep_checkpoints: int = 2
    log_every: int = 10
    # --- evaluation -------------------------------------------------------------------------------
    sample_steps: str = ""                  # few-step counts the result is scored at; "" means "S,2S"
    eval: bool = True                       # run the scorecard at the end (needs the EVAL helper's module)
    eval_prompts: int = 32
    eval_teacher_steps: int = 50
    eval_batch_size: int = 16               # videos per sampler call in the scorecard (seconds/video is amortised over it)
    extra: dict = field(default_factory=dict)  # free-form notes recorded in config.json

    @classmethod
    def smoke(cls, out, **overrides) -> "DistillConfig":
        """A seconds-long run on the tiny random model (tests, trying the tool out on a CPU)."""
        base = dict(model="tiny", out=str(out), teacher_steps=8, segments=2, pool_size=8, batch_size=4, mlcd_steps=12,
                    kd_steps=8, lr=1e-3, kd_lr=1e-3, warmup_steps=1, ckpt_every=4, log_every=1, calib_prompts=2,
                    error_budget=0.5, eval=False, device="cpu", precision="fp32")
        base.update(overrides)
        return cls(**base)

    # ---------------------------------------------------------------------------------------------
    def stage_list(self) -> list[str]:
        got = [s.strip() for s in self.stages.split(",") if s.strip()]
        bad = [s for s in got if s not in STAGES]
        if bad or not got:
            raise DistillConfigError(f"--stages must be a comma-separated subset of {','.join(STAGES)}, found {self.stages!r}")
        return [s for s in STAGES if s in got]

    def steps_list(self) -> list[int]:
        if not self.sample_steps.strip():
            return [self.segments, 2 * self.segments]
        try:
            return [int(s) for s in self.sample_steps.split(",") if s.strip()]
        except ValueError:
            raise DistillConfigError(f"--sample-steps must be integers separated by commas, found {self.sample_steps!r}") from None

    def validate(self) -> None:
        """Raise :class:`DistillConfigError` for anything that would fail later, before training starts."""
        self._check_numbers()
        self.stage_list()
        if self.teacher_steps < 1 or self.segments < 1:
            raise DistillConfigError(f"--teacher-steps and --segments must be >= 1, found {self.teacher_steps} and {self.segments}")
        if self.teacher_steps % self.segments:
            raise DistillConfigError(
                f"--segments {self.segments} does not divide --teacher-steps {self.teacher_steps}: each segment must hold a "
                f"whole number of teacher steps (try --teacher-steps {self.segments * max(1, round(self.teacher_steps / self.segments))})"
            )
        per_seg = self.teacher_steps // self.segments
        for n in self.steps_list():
            if n % self.segments or per_seg % (n // self.segments):
                raise DistillConfigError(
                    f"sample step count {n} is not usable: it must be S*m with m dividing the {per_seg} teacher steps of a segment (S={self.segments})"
                )
        if self.lr_decay not in ("none", "cosine", "linear"):
            raise DistillConfigError(f"--lr-decay must be none, cosine or linear, found {self.lr_decay!r}")
        if self.loss not in ("pseudo_huber", "mse"):
            raise DistillConfigError(f"--loss must be 'pseudo_huber' or 'mse', found {self.loss!r}")
        if self.kd_backend not in ("eager", "inductor", "auto"):
            raise DistillConfigError(f"--kd-backend must be eager, inductor or auto, found {self.kd_backend!r}")
        if self.precision not in ("auto", "fp32", "bf16"):
            raise DistillConfigError(f"--precision must be auto, fp32 or bf16, found {self.precision!r}")
        for name in ("batch_size", "pool_size", "ckpt_every", "skip", "calib_prompts", "keep_checkpoints"):
            if getattr(self, name) < 1:
                raise DistillConfigError(f"--{name.replace('_', '-')} must be >= 1, found {getattr(self, name)}")
        for stage in ("mlcd", "kd"):
            steps, minutes = getattr(self, f"{stage}_steps"), getattr(self, f"{stage}_max_minutes")
            if steps < 0 or minutes < 0:
                raise DistillConfigError(f"--{stage}-steps and --{stage}-max-minutes must be >= 0, found {steps} and {minutes}")
            if steps == 0 and minutes == 0 and stage in self.stage_list():
                raise DistillConfigError(f"--{stage}-steps 0 means 'as many steps as the time box holds', but no time box "
                                         f"is set: give --{stage}-max-minutes > 0 or a step count")
        if self.anchor_weight < 0 or self.consistency_weight < 0 or self.anchor_weight + self.consistency_weight == 0:
            raise DistillConfigError(f"--anchor-weight and --consistency-weight must be >= 0 and not both 0, found "
                                     f"{self.anchor_weight} and {self.consistency_weight}")
        if not 0.0 <= self.visited_fraction <= 1.0:
            raise DistillConfigError(f"--visited-fraction must be in [0, 1], found {self.visited_fraction}")
        for name in ("target_decay", "ema_decay"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise DistillConfigError(f"--{name.replace('_', '-')} must be in [0, 1), found {getattr(self, name)}")
        if self.prompts is not None and not Path(self.prompts).is_file():
            raise DistillConfigError(f"prompts file {self.prompts!r} does not exist (expected a text file, one prompt a line)")
        if self.plan is not None and not Path(self.plan).is_file():
            raise DistillConfigError(f"plan file {self.plan!r} does not exist")

    def _check_numbers(self) -> None:
        """Types and ranges of the numeric options: a negative or NaN learning rate, a negative pseudo-Huber
        knee or a string from a JSON config is refused before the run directory is created."""
        from ..validation import check_error_budget, check_number, check_output_dir

        pos = {"minimum": 0, "min_open": True}
        checks = {
            "lr": pos, "kd_lr": pos, "huber_c": pos, "grad_clip": {**pos, "allow_inf": True},
            "weight_decay": {"minimum": 0}, "mlcd_max_minutes": {"minimum": 0}, "kd_max_minutes": {"minimum": 0},
            "anchor_weight": {"minimum": 0}, "consistency_weight": {"minimum": 0},
            "visited_fraction": {"minimum": 0, "maximum": 1}, "target_decay": {"minimum": 0, "maximum": 1},
            "ema_decay": {"minimum": 0, "maximum": 1}, "guidance_scale": {"minimum": 0, "allow_none": True},
            "max_density": {"minimum": 0, "min_open": True, "maximum": 1, "allow_none": True},
        }
        ints = {"teacher_steps": 1, "segments": 1, "pool_size": 1, "batch_size": 1, "mlcd_steps": 0, "kd_steps": 0,
                "warmup_steps": 0, "skip": 1, "calib_prompts": 1, "ckpt_every": 1, "keep_checkpoints": 1,
                "log_every": 1, "seed": None, "eval_prompts": 1, "eval_teacher_steps": 1, "eval_batch_size": 1}
        try:
            for name, bounds in checks.items():
                check_number(f"--{name.replace('_', '-')}", getattr(self, name), **bounds)
            for name, lo in ints.items():
                check_number(f"--{name.replace('_', '-')}", getattr(self, name), minimum=lo, integer=True)
            if self.error_budget is not None:
                check_error_budget(self.error_budget, "--error-budget")
            check_output_dir(self.out, "--out directory")
        except (TypeError, ValueError) as exc:
            raise DistillConfigError(str(exc)) from None

    # ---------------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "DistillConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise DistillConfigError(f"unknown config keys {unknown}; known keys: {sorted(known)}")
        return cls(**d)

    def save(self, path) -> None:
        from .checkpoint import atomic_write_text

        atomic_write_text(Path(path), json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")

    @classmethod
    def load(cls, path) -> "DistillConfig":
        path = Path(path)
        if not path.is_file():
            raise DistillConfigError(f"{path} not found: is this a distillation run directory?")
        try:
            return cls.from_dict(json.loads(path.read_text()))
        except json.JSONDecodeError as exc:
            raise DistillConfigError(f"{path} is not valid JSON ({exc})") from None


def _parse_bool(s: str) -> bool:
    return s.lower() in ("1", "true", "yes", "on")


def build_arg_parser() -> argparse.ArgumentParser:
    """Command line: one option per config field, plus ``--resume``, ``--overwrite`` and ``--config``."""
    p = argparse.ArgumentParser(
        prog="distill.py",
        description="Distil a video DiT into a few-step, tile-sparse model (MLCD -> mask search -> KD).",
    )
    p.add_argument("--config", help="JSON file with config fields (the command line overrides it)")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue a run from its last checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out directory")
    defaults = DistillConfig()
    for f in fields(DistillConfig):
        if f.name == "extra":
            continue
        opt = "--" + f.name.replace("_", "-")
        default = getattr(defaults, f.name)
        if isinstance(default, bool):
            p.add_argument(opt, dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=f"(default {default})")
        else:
            typ = {int: int, float: float}.get(type(default), str)
            if f.name in ("guidance_scale", "error_budget", "max_density"):
                typ = float
            p.add_argument(opt, dest=f.name, type=typ, default=None, help=f"(default {default})")
    return p


def resolve_config(args: argparse.Namespace) -> DistillConfig:
    """Defaults < ``--config`` file < command-line options."""
    base = DistillConfig()
    if getattr(args, "config", None):
        base = DistillConfig.load(args.config)
    d = base.to_dict()
    for f in fields(DistillConfig):
        v = getattr(args, f.name, None)
        if v is not None:
            d[f.name] = v
    return DistillConfig.from_dict(d)
