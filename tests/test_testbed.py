"""The grokking testbed: SMOKE trains, writes its files, and its checkpoints load as OLMoE.

The SMOKE run is shared by the module (about 10 s, most of it the training
process's imports); a second run checks that the same seed gives the same
weights. No vLLM here: the other engine tests serve these folders.
"""

from __future__ import annotations

import csv
import json
from dataclasses import replace

import pytest
import torch
from safetensors import safe_open

from moepath.fixtures import testbed
from moepath.tracer.compare import CompareOptions
from moepath.tracer.errors import InputError, TrainingError

ROUTER = "model.layers.0.mlp.gate.weight"


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("testbed")
    return testbed.train(testbed.SMOKE, out, log=lambda message: None)


def router(folder):
    with safe_open(folder / "model.safetensors", "pt") as handle:
        return handle.get_tensor(ROUTER)


def test_smoke_writes_checkpoints_scores_samples_and_manifest(smoke):
    steps = testbed.SMOKE.checkpoint_steps
    assert [p.name for p in smoke.checkpoints] == [f"step{s:05d}" for s in steps]
    assert sorted(p.name for p in (smoke.out_dir / "checkpoints").iterdir()) == [
        f"step{s:05d}" for s in steps]
    for folder in smoke.checkpoints:
        assert {"config.json", "model.safetensors", "tokenizer.json"} <= {
            p.name for p in folder.iterdir()}
    manifest = json.loads((smoke.out_dir / "testbed.json").read_text())
    assert manifest["config_hash"] == testbed.SMOKE.hash()
    assert manifest["summary"]["steps_per_second"] > 0
    assert testbed.is_built(testbed.SMOKE, smoke.out_dir, verify=True)
    assert not testbed.is_built(replace(testbed.SMOKE, seed=1), smoke.out_dir)


def test_scores_csv_has_one_row_per_checkpoint_and_score_is_heldout_accuracy(smoke):
    with (smoke.out_dir / "scores.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert list(rows[0]) == ["checkpoint", "step", "score", "train_accuracy", "train_loss",
                             "heldout_accuracy", "heldout_loss"]
    assert [int(r["step"]) for r in rows] == list(testbed.SMOKE.checkpoint_steps)
    assert [r["checkpoint"] for r in rows] == [p.name for p in smoke.checkpoints]
    assert all(r["score"] == r["heldout_accuracy"] for r in rows)
    assert all(0 <= float(r["train_accuracy"]) <= 1 for r in rows)


def test_samples_jsonl_is_the_training_split_in_the_training_text_format(smoke):
    lines = [json.loads(line) for line in (smoke.out_dir / "samples.jsonl").open()]
    train, heldout = testbed.split(testbed.SMOKE)
    p = testbed.SMOKE.p
    assert len(lines) == len(train) == round(testbed.SMOKE.train_fraction * p * p)
    assert [line["id"] for line in lines] == [f"{e.a}+{e.b}" for e in train]
    assert {line["id"] for line in lines}.isdisjoint(e.sample_id for e in heldout)
    for line in lines:
        assert line["answer"] == (line["a"] + line["b"]) % p
        assert line["text"] == f"{line['a']} + {line['b']} = {line['answer']}"
        assert line["wraps"] == (line["a"] + line["b"] >= p)


def test_checkpoints_load_as_olmoe_with_the_word_level_tokenizer(smoke):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = smoke.checkpoints[-1]
    tokenizer = AutoTokenizer.from_pretrained(folder)
    p = testbed.SMOKE.p
    assert tokenizer("3 + 5 = 8").input_ids == [3, p, 5, p + 1, 8]  # no BOS added
    assert tokenizer.decode([3, p, 5, p + 1, 8]) == "3 + 5 = 8"
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    config = model.config
    assert (config.model_type, config.num_hidden_layers) == ("olmoe", 4)
    assert config.vocab_size == len(tokenizer) == p + 5
    assert not config.tie_word_embeddings and config.max_position_embeddings <= 64
    for token_id in (config.bos_token_id, config.eos_token_id, config.pad_token_id):
        assert 0 <= token_id < config.vocab_size
    assert (tokenizer.bos_token_id, tokenizer.pad_token_id) == (
        config.bos_token_id, config.pad_token_id)


def test_loaded_checkpoint_reproduces_the_recorded_train_accuracy(smoke):
    """Training used the grouped_mm experts; HF's default (eager loop) must agree."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, score = smoke.checkpoints[-1], smoke.scores[-1]
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    train, _ = testbed.split(testbed.SMOKE)
    ids = torch.tensor(tokenizer([e.text for e in train]).input_ids)
    with torch.no_grad():
        logits = model(input_ids=ids[:, :4]).logits[:, 3, : testbed.SMOKE.p]
    answers = ids[:, 4]
    assert (logits.argmax(-1) == answers).float().mean().item() == pytest.approx(
        score.train_accuracy)
    loss = torch.nn.functional.cross_entropy(logits, answers).item()
    assert loss == pytest.approx(score.train_loss, abs=1e-4)


def test_same_seed_gives_identical_weights_other_seed_differs(smoke, tmp_path):
    again = testbed.train(testbed.SMOKE, tmp_path / "again", log=lambda message: None)
    assert torch.equal(router(smoke.checkpoints[-1]), router(again.checkpoints[-1]))
    other = replace(testbed.SMOKE, seed=1, steps=1, checkpoint_steps=(1,))
    other_run = testbed.train(other, tmp_path / "other", log=lambda message: None)
    assert not torch.equal(router(smoke.checkpoints[1]), router(other_run.checkpoints[0]))


def test_training_runs_apart_with_avx2_kernels_whatever_this_process_uses(smoke):
    """The kernels that set the run's float rounding are chosen before torch loads in
    the training process, so the curve does not depend on the CPU's widest vectors."""
    native = torch.backends.cpu.get_cpu_capability()
    manifest = json.loads((smoke.out_dir / "testbed.json").read_text())
    assert manifest["cpu_kernels"] == ("AVX2" if native in ("AVX2", "AVX512") else native)
    assert torch.backends.cpu.get_cpu_capability() == native  # this process: untouched


def test_a_failed_training_process_is_an_error_and_leaves_nothing_built(tmp_path, monkeypatch):
    short = replace(testbed.SMOKE, steps=1, checkpoint_steps=(0, 1))
    monkeypatch.setattr(testbed.sys, "executable", "false")  # a process that exits with 1
    with pytest.raises(TrainingError, match=r"^testbed training failed \(exit status 1; its "
                                            r"traceback is printed above\); fix what it names "
                                            r"and rerun \(the partial checkpoints in '.*"
                                            r"checkpoints' are replaced\)$"):
        testbed.train(short, tmp_path, log=lambda message: None)
    assert not testbed.is_built(short, tmp_path)


def test_rerun_replaces_step_folders_and_refuses_foreign_content(tmp_path):
    short = replace(testbed.SMOKE, steps=1, checkpoint_steps=(0, 1))
    (tmp_path / "checkpoints" / "step09999").mkdir(parents=True)
    lines = []
    testbed.train(short, tmp_path, log=lines.append)
    assert [line.split()[:2] for line in lines[:2]] == [
        ["checkpoint", "step00000"], ["checkpoint", "step00001"]]
    assert lines[-1].startswith("testbed: 1 steps in ")
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [
        "step00000", "step00001"]
    (tmp_path / "scores.csv").unlink()
    assert not testbed.is_built(short, tmp_path)
    (tmp_path / "checkpoints" / "notes.txt").write_text("mine")
    with pytest.raises(InputError, match="not testbed step folders"):
        testbed.train(short, tmp_path, log=lambda message: None)


@pytest.mark.parametrize("change, message", [
    (dict(layers=2), "layers = 2: use >= 4"),
    (dict(heads=4), "head_dim >= 64"),
    (dict(p=12), "p = 12 must be a prime"),
    (dict(operation="%"), "operation '%'"),
    (dict(top_k=9), "top_k 9"),
    (dict(checkpoint_steps=(0, 7)), r"checkpoint_steps \(0, 7\) must be increasing"),
    (dict(checkpoint_steps=(3, 3)), "must be increasing, unique"),
    (dict(train_fraction=1.0), "train_fraction"),
    (dict(p=3, train_fraction=0.01), "train_fraction 0.01 of the 9 facts of p = 3 must leave "
                                     "at least one training and one held-out fact"),
])
def test_invalid_configs_are_named(change, message):
    with pytest.raises(InputError, match=message):
        replace(testbed.SMOKE, **change)


@pytest.mark.parametrize("operation, texts", [
    ("+", ["0 + 0 = 0", "0 + 1 = 1", "0 + 2 = 2", "1 + 0 = 1", "1 + 1 = 2", "1 + 2 = 0",
           "2 + 0 = 2", "2 + 1 = 0", "2 + 2 = 1"]),
    ("-", ["0 - 0 = 0", "0 - 1 = 2", "0 - 2 = 1", "1 - 0 = 1", "1 - 1 = 0", "1 - 2 = 2",
           "2 - 0 = 2", "2 - 1 = 1", "2 - 2 = 0"]),
    ("/", ["0 / 1 = 0", "0 / 2 = 0", "1 / 1 = 1", "1 / 2 = 2", "2 / 1 = 2", "2 / 2 = 1"]),
])
def test_examples_of_p_3_are_hand_checked(operation, texts):
    config = replace(testbed.SMOKE, p=3, operation=operation)
    assert [e.text for e in testbed.examples(config)] == texts


def test_every_config_problem_is_named_at_once():
    with pytest.raises(InputError, match="^invalid testbed config: p = 12 must be a prime >= 3; "
                                         "top_k 9 must be in 1..experts"):
        replace(testbed.SMOKE, p=12, top_k=9)


def test_a_sample_is_memorised_within_a_margin_of_the_operand_floor():
    # of the four predicted tokens (+, b, =, answer) only b is unpredictable: log(37) / 4
    assert testbed.loss_floor(testbed.DEFAULT) == pytest.approx(0.902729, abs=1e-6)
    assert testbed.memorised_loss(testbed.DEFAULT) == pytest.approx(0.952729, abs=1e-6)


def test_the_demo_compares_memorised_samples_from_the_first_checkpoint_after_memorisation(
        tmp_path):
    result = testbed.TestbedResult(tmp_path, testbed.DEFAULT, [], [], memorised_step=70,
                                   heldout_50_step=1025, heldout_90_step=1650, seconds=400.0,
                                   steps_per_second=4.6)
    options = testbed.compare_options(result)
    assert (options.memorised_only, options.from_step, options.from_t_star) == (True, 100, True)
    assert options.epsilon == testbed.memorised_loss(testbed.DEFAULT)
    assert options.scores == tmp_path / "scores.csv"
    never = testbed.compare_options(replace(result, memorised_step=None))  # e.g. the smoke run
    assert never == CompareOptions(scores=tmp_path / "scores.csv")
