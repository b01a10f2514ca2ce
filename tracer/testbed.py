"""The grokking testbed: a tiny OLMoE that memorises modular arithmetic, then generalises.

``moepath demo`` needs checkpoints whose held-out accuracy rises long after the
training set is memorised, built here on a 2-core CPU in about ten minutes, so
that the pathway metrics (docs/method.md) can be compared against a known
generalisation curve. :func:`train` trains deterministically (one seed, full
batch AdamW, pinned CPU kernels, in a child process) and writes::

    out_dir/checkpoints/step00000/ ...  HF folders (float32 OlmoeForCausalLM + tokenizer)
    out_dir/scores.csv                  checkpoint, step, score, train_accuracy, train_loss,
                                        heldout_accuracy, heldout_loss  (score = held-out acc)
    out_dir/samples.jsonl               the training split, one line per example
    out_dir/testbed.json                config, its hash, versions, CPU kernels, files
                                        (size, sha256), the curve

Task and text format. A sample is the text ``"a + b = c"`` (``c = a op b mod p``)
with a word-level vocabulary: token id n is the number n (0..p-1), then the
operator, ``=``, ``<|endoftext|>`` (bos/eos), ``<|pad|>`` and ``<|unk|>``. No BOS
is added, so ``AutoTokenizer(text).input_ids`` is exactly five ids and vLLM
sees what the model was trained on. Training feeds the first four ids (causal
attention and per-token routing make position 4 irrelevant to positions 0-3).

Objective, and what ``moepath compare``'s per-sample loss means. compare's loss is
the mean next-token NLL over the sample's tokens after the first, i.e. over the
four targets ``+``, ``b``, ``=``, ``c`` (full-vocabulary log-softmax). The model
is trained on exactly those four positions::

    loss = NLL(c | a + b =) + prompt_loss_coef * (NLL(+ | a) + NLL(= | a + b)
                                                  + H(uniform_p, P(. | a +)))
           + router_aux_loss_coef * OLMoE load-balancing loss

``+`` and ``=`` are deterministic; the operand ``b`` is unpredictable, so its
target is the uniform distribution over the p numbers (its NLL settles near
``log p`` for every sample, instead of the model memorising which operands
occur with ``a`` in the training split). Once those prompt terms have settled,
compare's per-sample loss is ``(log p + answer NLL) / 4`` plus small, nearly
constant terms: it ranks samples by their answer loss, and a memorised sample
sits near ``log(p) / 4`` (0.90 for p = 37). ``prompt_loss_coef`` is 0.1: at 1.0
the two deterministic targets stalled the answer of a 4-layer model for
hundreds of steps; 0 trains the answer only, as docs/testbed-spec.md did (then three
of compare's four terms are untrained and drift).

Accuracy and the ``train_loss`` / ``heldout_loss`` columns are read at the last
prompt position over the p number logits only (argmax and cross-entropy), as in
docs/testbed-spec.md.

Example::

    result = train(SMOKE, "out/testbed")
    is_built(SMOKE, "out/testbed")   # True: a caller may skip rebuilding
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import os
import random
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from .errors import InputError, TrainingError

FORMAT_VERSION = 2  # 2: trained with ATen's AVX2 kernels on AVX2+ CPUs
OPERATIONS = ("+", "-", "*", "/")
EOS, PAD, UNK = "<|endoftext|>", "<|pad|>", "<|unk|>"
MAX_POSITIONS = 32  # samples are 5 tokens; small keeps vLLM's KV cache tiny
PROMPT_LEN = 4  # "a op b =": the ids the model reads
ANSWER_POSITION = PROMPT_LEN - 1  # the answer is predicted at "=", the last prompt id
# Nats above the loss floor within which a testbed sample counts as memorised (memorised_loss).
MEMORISED_LOSS_MARGIN = 0.05
_CHECKPOINT_DIR = "checkpoints"
_FILES = ("scores.csv", "samples.jsonl")
_MANIFEST = "testbed.json"  # written last: its presence means the run is complete


@dataclass(frozen=True)
class TestbedConfig:
    """Every setting of a testbed run; the same config gives the same checkpoints.

    (Bit-identical for the same library versions and CPU kernels; with the
    kernels :func:`train` pins, machines A and C of bench/README.md, an AVX2 and
    an AVX-512 AMD EPYC, log the same curve. The seed fixes the split and the
    initialisation, and nothing else is random.)

    Steps count optimiser updates: checkpoint ``step00300`` holds the weights
    after 300 updates (``step00000`` is the initialisation). ``threads`` is part
    of the config because the float summation order, hence the exact weights,
    depends on it.
    """

    p: int = 37
    operation: str = "+"
    train_fraction: float = 0.5
    seed: int = 0
    layers: int = 4
    hidden: int = 128
    heads: int = 2
    intermediate: int = 128
    experts: int = 8
    top_k: int = 2
    lr: float = 3e-3
    weight_decay: float = 1.0
    betas: tuple[float, float] = (0.9, 0.98)
    warmup_steps: int = 0
    steps: int = 1825
    checkpoint_steps: tuple[int, ...] = (0, 1825)
    router_aux_loss_coef: float = 0.01
    prompt_loss_coef: float = 0.1
    eval_every: int = 25
    threads: int = 2

    __test__ = False  # not a pytest test class despite its name

    def __post_init__(self) -> None:
        problems = _config_problems(self)
        if problems:
            raise InputError(f"invalid testbed config: {'; '.join(problems)}")

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def hash(self) -> str:
        """sha256 of the settings and the testbed format version (hex)."""
        payload = json.dumps({"format": FORMAT_VERSION, "config": asdict(self)}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()


def _config_problems(c: TestbedConfig) -> list[str]:
    """Human-readable problems with ``c`` (empty when valid)."""
    checks = [
        (c.operation in OPERATIONS, f"operation {c.operation!r} is not one of {OPERATIONS}"),
        (c.p >= 3 and _is_prime(c.p), f"p = {c.p} must be a prime >= 3"),
        (0 < c.train_fraction < 1, f"train_fraction {c.train_fraction} must be in (0, 1)"),
        (1 <= round(c.train_fraction * _fact_count(c)) < _fact_count(c),
         f"train_fraction {c.train_fraction} of the {_fact_count(c)} facts of p = {c.p} must "
         f"leave at least one training and one held-out fact"),
        (c.layers >= 4, f"layers = {c.layers}: use >= 4 (with fewer MoE layers the "
                        "consistency metric is degenerate)"),
        (c.heads > 0 and c.hidden % c.heads == 0 and c.hidden // c.heads >= 64,
         f"hidden {c.hidden} / heads {c.heads} must be a whole head_dim >= 64 (vLLM CPU)"),
        (1 <= c.top_k <= c.experts, f"top_k {c.top_k} must be in 1..experts ({c.experts})"),
        (c.steps >= 1 and c.warmup_steps >= 0, "steps must be >= 1 and warmup_steps >= 0"),
        (c.eval_every >= 1 and c.threads >= 1, "eval_every and threads must be >= 1"),
        (_increasing_within(c.checkpoint_steps, c.steps),
         f"checkpoint_steps {c.checkpoint_steps} must be increasing, unique, in 0..{c.steps}"),
    ]
    return [message for ok, message in checks if not ok]


def _fact_count(c: TestbedConfig) -> int:
    """How many facts :func:`examples` gives: p x p, less b = 0 for division."""
    return c.p * c.p - (c.p if c.operation == "/" else 0)


def _increasing_within(steps: tuple[int, ...], last: int) -> bool:
    return bool(steps) and all(a < b for a, b in zip(steps, steps[1:], strict=False)) and (
        steps[0] >= 0 and steps[-1] <= last)


def _is_prime(n: int) -> bool:
    return n >= 2 and all(n % d for d in range(2, math.isqrt(n) + 1))


# Tuned on the 2-core CPU (bench/grokking/README.md). Memorised by step 70 while
# held-out accuracy stays near 2% until step 200; held-out passes 50% near step
# 1,025 and 90% near 1,650. Checkpoints: init, memorisation, plateau, rise.
DEFAULT = TestbedConfig(
    p=37, train_fraction=0.5, steps=1825,
    checkpoint_steps=(0, 25, 50, 100, 200, 400, 600, 800, 1050, 1300, 1500, 1650, 1825))

# CI: a few steps, three checkpoints, well under a minute; no grokking.
# One thread: 2 OpenMP threads can crawl when other processes share the 2 cores.
SMOKE = TestbedConfig(p=11, steps=6, checkpoint_steps=(0, 3, 6), eval_every=3,
                      intermediate=64, threads=1)


@dataclass(frozen=True)
class CheckpointScore:
    """One row of scores.csv: accuracies and losses of one checkpoint (number logits only)."""

    checkpoint: str
    step: int
    train_accuracy: float
    train_loss: float
    heldout_accuracy: float
    heldout_loss: float
    seconds: float  # training wall time when the checkpoint was saved (not in scores.csv)


@dataclass(frozen=True)
class TestbedResult:
    """What :func:`train` produced. Threshold steps are None when never reached.

    ``memorised_step``: first step whose weights get >= 99% train accuracy (every
    step is checked). ``heldout_50_step`` / ``heldout_90_step``: first evaluated
    step (a multiple of ``eval_every`` or a checkpoint) with held-out accuracy
    >= 50% / >= 90%.
    """

    out_dir: Path
    config: TestbedConfig
    checkpoints: list[Path]
    scores: list[CheckpointScore]
    memorised_step: int | None
    heldout_50_step: int | None
    heldout_90_step: int | None
    seconds: float
    steps_per_second: float

    __test__ = False


@dataclass(frozen=True)
class Example:
    """One arithmetic fact; ``text`` is the exact training and tracing text."""

    a: int
    b: int
    answer: int
    text: str
    sample_id: str
    wraps: bool  # a + b >= p (addition) or a - b < 0 (subtraction); False otherwise

    def record(self, operation: str) -> dict:
        """The samples.jsonl line (``wraps`` only for + and -)."""
        line = {"id": self.sample_id, "text": self.text, "a": self.a, "b": self.b,
                "answer": self.answer}
        return {**line, "wraps": self.wraps} if operation in ("+", "-") else line


def examples(config: TestbedConfig) -> list[Example]:
    """All p x p facts in (a, b) order (b = 0 excluded for division)."""
    p, op = config.p, config.operation
    facts = []
    for a in range(p):
        for b in range(p):
            if op == "/" and b == 0:
                continue
            answer = _apply(op, a, b, p)
            wraps = (op == "+" and a + b >= p) or (op == "-" and a < b)
            facts.append(Example(a, b, answer, f"{a} {op} {b} = {answer}", f"{a}{op}{b}", wraps))
    return facts


def _apply(op: str, a: int, b: int, p: int) -> int:
    if op == "+":
        return (a + b) % p
    if op == "-":
        return (a - b) % p
    if op == "*":
        return a * b % p
    return a * pow(b, -1, p) % p


def split(config: TestbedConfig) -> tuple[list[Example], list[Example]]:
    """(train, held-out): a seeded shuffle, the first ``train_fraction`` for training.

    Both lists are sorted by (a, b) so files read naturally.
    """
    facts = examples(config)
    order = list(range(len(facts)))
    random.Random(config.seed).shuffle(order)
    cut = round(config.train_fraction * len(facts))
    train_ids, heldout_ids = sorted(order[:cut]), sorted(order[cut:])
    return [facts[i] for i in train_ids], [facts[i] for i in heldout_ids]


def build_tokenizer(config: TestbedConfig):
    """A word-level ``PreTrainedTokenizerFast``: id n is the number n, then op, '=', specials."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = [str(n) for n in range(config.p)] + [config.operation, "=", EOS, PAD, UNK]
    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token=UNK))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token=EOS, eos_token=EOS, pad_token=PAD, unk_token=UNK,
        model_max_length=MAX_POSITIONS)


def model_config(config: TestbedConfig, tokenizer):
    """The ``OlmoeConfig`` (float32, untied embeddings, specials inside the vocabulary)."""
    from transformers import OlmoeConfig

    return OlmoeConfig(
        vocab_size=len(tokenizer), hidden_size=config.hidden, num_hidden_layers=config.layers,
        num_attention_heads=config.heads, num_key_value_heads=config.heads,
        intermediate_size=config.intermediate, num_experts=config.experts,
        num_experts_per_tok=config.top_k, router_aux_loss_coef=config.router_aux_loss_coef,
        max_position_embeddings=MAX_POSITIONS, tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id)


def train(config: TestbedConfig, out_dir: str | Path,
          log: Callable[[str], None] = print) -> TestbedResult:
    """Train the testbed into ``out_dir`` and return the curve (see the module docstring).

    The training runs in a child Python process whose environment fixes, before
    torch loads, what decides its float rounding and speed (:func:`_training_environment`),
    whatever the calling process has imported or set; its log lines are passed to
    ``log``. Deterministic for a given config, library versions and CPU kernels
    (seeded init and split, full batch, no dropout, deterministic algorithms).
    Existing ``checkpoints/stepNNNNN`` folders in ``out_dir`` are replaced;
    ``testbed.json`` is written last, so an interrupted run is never "built".

    Raises:
        InputError: ``out_dir/checkpoints`` holds something other than step folders.
        TrainingError: the training process failed (its traceback is on stderr).
    """
    out = Path(out_dir)
    _prepare(out)
    command = [sys.executable, "-m", __name__, json.dumps(asdict(config)), str(out)]
    with subprocess.Popen(command, env=_training_environment(), stdout=subprocess.PIPE,
                          text=True) as child:
        try:
            for line in child.stdout:
                log(line.rstrip("\n"))
        except BaseException:
            child.kill()
            raise
    if child.returncode:
        raise TrainingError(f"testbed training failed (exit status {child.returncode}; its "
                            f"traceback is printed above); fix what it names and rerun (the "
                            f"partial checkpoints in '{out / _CHECKPOINT_DIR}' are replaced)")
    return read_result(config, out)


def _training_environment() -> dict[str, str]:
    """This process's environment plus the training settings; settings already set win.

    - ``OMP_WAIT_POLICY=PASSIVE``: GNU OpenMP threads spin while they wait; with 2
      threads on 2 cores that another process also uses (vLLM tests), a step
      became 15-90x slower.
    - ``ATEN_CPU_CAPABILITY=avx2`` on CPUs with AVX2 or more: ATen's vector width
      sets the summation order of its reductions, and this run's trajectory is
      chaotic enough that on an AVX-512 CPU the native kernels gave a curve that
      stalled near 50% held-out accuracy, where AVX2 kernels reproduce the
      documented one bit for bit (bench/grokking/README.md, "Across CPUs").
    """
    import torch

    env = dict(os.environ)
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    if torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512"):
        env.setdefault("ATEN_CPU_CAPABILITY", "avx2")
    return env


def _train_here(config: TestbedConfig, out: Path) -> None:
    """The child process of :func:`train`: the run, scores.csv, then testbed.json."""
    import torch
    from transformers.utils import logging as hf_logging

    torch.set_num_threads(config.threads)
    torch.use_deterministic_algorithms(True, warn_only=True)
    hf_logging.disable_progress_bar()

    def log(line: str) -> None:
        print(line, flush=True)

    result = _Run(config, out, log).run()
    _write_scores(out / "scores.csv", result.scores)
    _write_manifest(out, result)
    _log_summary(result, log)


def read_result(config: TestbedConfig, out_dir: str | Path) -> TestbedResult:
    """The :class:`TestbedResult` of the run in ``out_dir``, from its testbed.json (check
    :func:`is_built` first)."""
    out = Path(out_dir)
    manifest = json.loads((out / _MANIFEST).read_text())
    return TestbedResult(
        out, config, [_folder(out, step) for step in config.checkpoint_steps],
        [CheckpointScore(**row) for row in manifest["curve"]], **manifest["summary"])


def loss_floor(config: TestbedConfig) -> float:
    """The lowest per-sample loss ``moepath compare`` can measure on the testbed (nats).

    compare's loss is the mean NLL over the :data:`PROMPT_LEN` predicted tokens (``+``,
    ``b``, ``=``, the answer); a model that has memorised a sample predicts all of them
    except the operand ``b``, which is unpredictable (uniform over the p numbers, NLL
    log p): the floor is ``log(p) / PROMPT_LEN``, 0.903 for p = 37.
    """
    return math.log(config.p) / PROMPT_LEN


def memorised_loss(config: TestbedConfig) -> float:
    """The memorisation threshold epsilon for the testbed's samples (nats):
    :func:`loss_floor` + :data:`MEMORISED_LOSS_MARGIN` (0.953 for p = 37).

    docs/method.md's quantile default (the paper: 20-25% of pretraining samples qualify)
    does not fit here: every training sample reaches the floor, and a quantile of the
    final losses would split them by noise around it.
    """
    return loss_floor(config) + MEMORISED_LOSS_MARGIN


def compare_options(result: TestbedResult):
    """How ``moepath demo`` compares the run's checkpoints: docs/method.md's protocol.

    Metrics on memorised samples only (epsilon :func:`memorised_loss`), correlated with
    the held-out accuracy (scores.csv) from the first checkpoint at or after the
    run's memorisation step (``memorised_step``: train accuracy >= 99%), each ``t*=N``
    group from step N. A run that never memorised (the smoke run) is compared over all
    samples and every checkpoint. Returns a :class:`~moepath.tracer.compare.CompareOptions`.
    """
    from .compare import CompareOptions

    scores = result.out_dir / "scores.csv"
    steps = result.config.checkpoint_steps
    if result.memorised_step is None or result.memorised_step > steps[-1]:
        return CompareOptions(scores=scores)
    from_step = min(step for step in steps if step >= result.memorised_step)
    return CompareOptions(scores=scores, memorised_only=True,
                          epsilon=memorised_loss(result.config), from_step=from_step)


def is_built(config: TestbedConfig, out_dir: str | Path, verify: bool = False) -> bool:
    """True when ``out_dir`` holds a complete run of exactly ``config``.

    Checks the config hash and that every recorded file exists with its size;
    ``verify`` also recomputes each file's sha256 (slower: reads every weight).
    """
    out = Path(out_dir)
    try:
        manifest = json.loads((out / _MANIFEST).read_text())
    except (OSError, ValueError):
        return False
    if manifest.get("config_hash") != config.hash():
        return False
    for name, entry in manifest.get("files", {}).items():
        path = out / name
        if not path.is_file() or path.stat().st_size != entry["bytes"]:
            return False
        if verify and _sha256(path) != entry["sha256"]:
            return False
    return bool(manifest.get("files"))


class _Run:
    """One training run: data tensors, model, optimiser, evaluation and checkpoints."""

    def __init__(self, config: TestbedConfig, out: Path, log: Callable[[str], None]):
        import torch
        from transformers import AutoModelForCausalLM

        self.config, self.out, self.log = config, out, log
        self.tokenizer = build_tokenizer(config)
        train_set, heldout_set = split(config)
        _write_samples(out / "samples.jsonl", train_set, config.operation)
        self.train_x, self.train_y = self._tensors(train_set)  # [N, 4] ids, [N] answers
        self.heldout_x, self.heldout_y = self._tensors(heldout_set)
        torch.manual_seed(config.seed)
        # grouped_mm: the eager expert loop is ~15x slower to train on CPU; same maths
        self.model = AutoModelForCausalLM.from_config(
            model_config(config, self.tokenizer), dtype=torch.float32,
            experts_implementation="grouped_mm")
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=config.lr,
                                           weight_decay=config.weight_decay, betas=config.betas)
        self.uniform = self._operand_target()
        self.scores: list[CheckpointScore] = []
        self.memorised = self.heldout_50 = self.heldout_90 = None

    def _tensors(self, facts: list[Example]):
        """Prompt ids [N, 4] from the tokenizer itself (so they match vLLM's) and answers [N]."""
        import torch

        ids = self.tokenizer([f.text for f in facts]).input_ids
        if any(len(row) != PROMPT_LEN + 1 for row in ids):
            raise AssertionError("testbed tokenizer must give 5 ids per sample")  # a bug, not input
        ids = torch.tensor(ids)
        return ids[:, :PROMPT_LEN], ids[:, PROMPT_LEN]

    def _operand_target(self):
        """[V] target distribution of the operand position: uniform over the p numbers."""
        import torch

        target = torch.zeros(len(self.tokenizer))
        target[: self.config.p] = 1.0 / self.config.p
        return target

    def run(self) -> TestbedResult:
        import torch

        start = time.perf_counter()
        wanted = set(self.config.checkpoint_steps)
        if 0 in wanted:
            self._checkpoint(0, 0.0)
        self.model.train()
        for step in range(1, self.config.steps + 1):
            self._set_lr(step)
            accuracy = self._step()  # of the weights after step - 1 updates
            if accuracy >= 0.99 and self.memorised is None:
                self.memorised = step - 1
            if step in wanted:
                self._checkpoint(step, time.perf_counter() - start)
            elif step % self.config.eval_every == 0:
                with torch.no_grad():
                    self._track_heldout(step, self._evaluate(self.heldout_x, self.heldout_y)[0])
        seconds = time.perf_counter() - start
        return TestbedResult(
            self.out, self.config, [_folder(self.out, s) for s in self.config.checkpoint_steps],
            self.scores, self.memorised, self.heldout_50, self.heldout_90, seconds,
            self.config.steps / seconds)

    def _set_lr(self, step: int) -> None:
        """Linear warm-up over ``warmup_steps``, then constant."""
        scale = min(1.0, step / self.config.warmup_steps) if self.config.warmup_steps else 1.0
        for group in self.optimizer.param_groups:
            group["lr"] = self.config.lr * scale

    def _step(self) -> float:
        """One full-batch AdamW update; returns train accuracy before it."""
        import torch.nn.functional as F

        c = self.config
        out = self.model(input_ids=self.train_x, output_router_logits=c.router_aux_loss_coef > 0)
        logp = F.log_softmax(out.logits, dim=-1)  # [N, 4, V]
        answer_loss = F.nll_loss(logp[:, ANSWER_POSITION], self.train_y)
        loss = answer_loss + c.prompt_loss_coef * self._prompt_loss(logp)
        if c.router_aux_loss_coef > 0:
            loss = loss + c.router_aux_loss_coef * out.aux_loss
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        answers = out.logits[:, ANSWER_POSITION, : c.p]
        return (answers.argmax(-1) == self.train_y).float().mean().item()

    def _prompt_loss(self, logp):
        """NLL of '+' after a and '=' after b, and cross-entropy to uniform at the operand."""
        operator, equals = self.train_x[0, 1], self.train_x[0, ANSWER_POSITION]
        return (-logp[:, 0, operator].mean() - logp[:, 2, equals].mean()
                - (logp[:, 1] * self.uniform).sum(-1).mean())

    def _evaluate(self, x, y) -> tuple[float, float]:
        """(accuracy, cross-entropy) at the answer position over the p number logits."""
        import torch.nn.functional as F

        logits = self.model(input_ids=x).logits[:, ANSWER_POSITION, : self.config.p]
        accuracy = (logits.argmax(-1) == y).float().mean().item()
        return accuracy, F.cross_entropy(logits, y).item()

    def _track_heldout(self, step: int, accuracy: float) -> None:
        if accuracy >= 0.5 and self.heldout_50 is None:
            self.heldout_50 = step
            self.log(f"step {step}: held-out accuracy passed 50% ({accuracy:.3f})")
        if accuracy >= 0.9 and self.heldout_90 is None:
            self.heldout_90 = step
            self.log(f"step {step}: held-out accuracy passed 90% ({accuracy:.3f})")

    def _checkpoint(self, step: int, seconds: float) -> None:
        """Score the current weights on both splits and save them as an HF folder."""
        import torch

        self.model.eval()
        with torch.no_grad():
            train_acc, train_loss = self._evaluate(self.train_x, self.train_y)
            heldout_acc, heldout_loss = self._evaluate(self.heldout_x, self.heldout_y)
        self.model.train()
        if train_acc >= 0.99 and self.memorised is None:
            self.memorised = step
        self._track_heldout(step, heldout_acc)
        folder = _folder(self.out, step)
        self.model.save_pretrained(folder)
        self.tokenizer.save_pretrained(folder)
        self.scores.append(CheckpointScore(folder.name, step, train_acc, train_loss,
                                           heldout_acc, heldout_loss, seconds))
        self.log(f"checkpoint {folder.name}  {seconds:6.1f} s  train acc {train_acc:.3f}  "
                 f"held-out acc {heldout_acc:.3f}  train loss {train_loss:.4f}")


def _folder(out: Path, step: int) -> Path:
    return out / _CHECKPOINT_DIR / f"step{step:05d}"


def _prepare(out: Path) -> None:
    """Create ``out``; drop a stale manifest and earlier step folders (nothing else)."""
    checkpoints = out / _CHECKPOINT_DIR
    if checkpoints.exists():
        foreign = [p.name for p in checkpoints.iterdir()
                   if not (p.is_dir() and p.name.startswith("step") and p.name[4:].isdigit())]
        if foreign:
            raise InputError(f"'{checkpoints}' holds {foreign[:3]}, not testbed step folders; "
                             "pass an empty or earlier testbed output folder")
        shutil.rmtree(checkpoints)
    (out / _MANIFEST).unlink(missing_ok=True)
    checkpoints.mkdir(parents=True)


def _write_samples(path: Path, facts: list[Example], operation: str) -> None:
    path.write_text("".join(json.dumps(f.record(operation)) + "\n" for f in facts))


SCORE_COLUMNS = ("checkpoint", "step", "score", "train_accuracy", "train_loss",
                 "heldout_accuracy", "heldout_loss")


def _write_scores(path: Path, scores: list[CheckpointScore]) -> None:
    """scores.csv for ``moepath compare --scores``: score is the held-out accuracy."""
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(SCORE_COLUMNS)
        for s in scores:
            writer.writerow([s.checkpoint, s.step, f"{s.heldout_accuracy:.6f}",
                             f"{s.train_accuracy:.6f}", f"{s.train_loss:.6f}",
                             f"{s.heldout_accuracy:.6f}", f"{s.heldout_loss:.6f}"])


def _write_manifest(out: Path, result: TestbedResult) -> None:
    """testbed.json, written last and atomically: config, hash, files, curve, versions."""
    import tokenizers
    import torch
    import transformers

    files = sorted(_FILES) + sorted(
        str(p.relative_to(out)) for folder in result.checkpoints for p in folder.iterdir())
    manifest = {
        "format_version": FORMAT_VERSION,
        "config": asdict(result.config),
        "config_hash": result.config.hash(),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "tokenizers": tokenizers.__version__},
        "cpu_kernels": torch.backends.cpu.get_cpu_capability(),  # ATen's vector ISA
        "summary": summary(result),
        "curve": [asdict(s) for s in result.scores],
        "files": {name: {"bytes": (out / name).stat().st_size, "sha256": _sha256(out / name)}
                  for name in files},
    }
    tmp = out / f"{_MANIFEST}.tmp"
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    tmp.replace(out / _MANIFEST)


def summary(result: TestbedResult) -> dict:
    """The run's thresholds and speed, keyed by their :class:`TestbedResult` field names
    (:func:`read_result` passes them back)."""
    return {"memorised_step": result.memorised_step, "heldout_50_step": result.heldout_50_step,
            "heldout_90_step": result.heldout_90_step, "seconds": round(result.seconds, 1),
            "steps_per_second": round(result.steps_per_second, 2)}


def _log_summary(result: TestbedResult, log: Callable[[str], None]) -> None:
    def at(step: int | None) -> str:
        return "never" if step is None else f"step {step}"

    log(f"testbed: {result.config.steps} steps in {result.seconds:.0f} s "
        f"({result.steps_per_second:.2f} steps/s); train accuracy >= 99% at "
        f"{at(result.memorised_step)}; held-out >= 50% at {at(result.heldout_50_step)}, "
        f">= 90% at {at(result.heldout_90_step)}")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


__all__ = ["DEFAULT", "SMOKE", "CheckpointScore", "Example", "TestbedConfig", "TestbedResult",
           "build_tokenizer", "compare_options", "examples", "is_built", "loss_floor",
           "memorised_loss", "model_config", "read_result", "split", "summary", "train"]


if __name__ == "__main__":  # the child process of train(): CONFIG_JSON OUT_DIR
    fields = {k: tuple(v) if isinstance(v, list) else v for k, v in json.loads(sys.argv[1]).items()}
    _train_here(TestbedConfig(**fields), Path(sys.argv[2]))
