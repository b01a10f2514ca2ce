"""The grokking testbed: SMOKE trains, writes its files, and its checkpoints load as OLMoE.

The SMOKE run is shared by the module (about 10 s, most of it the training
process's imports); a second run checks that the same seed gives the same
weights. No vLLM here: the other engine tests serve these folders.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import asdict, replace

import pytest
import torch
from safetensors import safe_open

from moepath.fixtures import testbed
from moepath.tracer.compare import CompareOptions
from moepath.tracer.errors import InputError, TrainingError

ROUTER = "model.layers.0.mlp.gate.weight"
# SMOKE cut to one step, every cohort joining at step 0
ONE_STEP = replace(testbed.SMOKE, steps=1, checkpoint_steps=(0, 1),
                   domains=tuple((op, fraction, (0,)) for op, fraction, _ in
                                 testbed.SMOKE.domains))


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


def test_scores_csv_has_a_row_per_checkpoint_and_domain_and_score_is_heldout_accuracy(smoke):
    with (smoke.out_dir / "scores.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert list(rows[0]) == ["checkpoint", "step", "group", "score", "train_accuracy",
                             "train_loss", "heldout_accuracy", "heldout_loss"]
    groups = ["add", "mul", "sub", ""]  # "": every domain pooled, the score of group `all`
    assert [(int(r["step"]), r["group"]) for r in rows] == [
        (step, group) for step in testbed.SMOKE.checkpoint_steps for group in groups]
    assert [r["checkpoint"] for r in rows[::4]] == [p.name for p in smoke.checkpoints]
    assert all(r["score"] == r["heldout_accuracy"] for r in rows)
    assert all(0 <= float(r["train_accuracy"]) <= 1 for r in rows)
    _, heldout = testbed.split(testbed.SMOKE)
    sizes = [sum(e.domain == name for e in heldout) for name in groups[:3]]
    for first in range(0, len(rows), 4):  # the pooled row weights each domain by its items
        accuracies = [float(r["heldout_accuracy"]) for r in rows[first:first + 3]]
        pooled = sum(a * n for a, n in zip(accuracies, sizes, strict=True)) / sum(sizes)
        assert float(rows[first + 3]["heldout_accuracy"]) == pytest.approx(pooled, abs=1e-6)


def test_samples_jsonl_is_the_training_split_with_domain_and_stage(smoke):
    lines = [json.loads(line) for line in (smoke.out_dir / "samples.jsonl").open()]
    train, heldout = testbed.split(testbed.SMOKE)
    p = testbed.SMOKE.p
    # sub: round(0.6 x 49) facts; add and mul: round(0.6 x 28) unordered pairs {a, b}
    units = {"add": 17, "mul": 17, "sub": 29}
    assert len(lines) == len(train)
    assert [line["id"] for line in lines] == [e.sample_id for e in train]
    assert {line["id"] for line in lines}.isdisjoint(e.sample_id for e in heldout)
    apply = {"add": lambda a, b: (a + b) % p, "mul": lambda a, b: a * b % p,
             "sub": lambda a, b: (a - b) % p}
    symbol = {"add": "+", "mul": "*", "sub": "-"}
    for line in lines:
        assert line["answer"] == apply[line["domain"]](line["a"], line["b"])
        assert line["text"] == f"{line['a']} {symbol[line['domain']]} {line['b']} = " \
                               f"{line['answer']}"
        assert line["introduced_step"] == (0, 3)[line["stage"]]
    for domain, count in units.items():  # each domain's units are dealt into the cohorts
        mine = {(line["a"], line["b"]): line["stage"] for line in lines
                if line["domain"] == domain}
        by_unit = {frozenset(pair) if domain != "sub" else pair: stage
                   for pair, stage in mine.items()}
        assert len(by_unit) == count
        stages = list(by_unit.values())
        assert (stages.count(0), stages.count(1)) == ((count + 1) // 2, count // 2)
        if domain != "sub":  # a commuted fact is on the same side, in the same cohort
            assert all(mine[(b, a)] == stage for (a, b), stage in mine.items())


def test_checkpoints_load_as_olmoe_with_the_word_level_tokenizer(smoke):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = smoke.checkpoints[-1]
    tokenizer = AutoTokenizer.from_pretrained(folder)
    p = testbed.SMOKE.p  # then the operators in the config's order: +, *, -; then =
    assert tokenizer("3 + 5 = 1").input_ids == [3, p, 5, p + 3, 1]  # no BOS added
    assert tokenizer("3 - 5 = 5").input_ids == [3, p + 2, 5, p + 3, 5]
    assert tokenizer.decode([3, p + 1, 5, p + 3, 1]) == "3 * 5 = 1"
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    config = model.config
    assert (config.model_type, config.num_hidden_layers) == ("olmoe", 4)
    assert config.vocab_size == len(tokenizer) == p + 3 + 4
    assert not config.tie_word_embeddings and config.max_position_embeddings <= 64
    for token_id in (config.bos_token_id, config.eos_token_id, config.pad_token_id):
        assert 0 <= token_id < config.vocab_size
    assert (tokenizer.bos_token_id, tokenizer.pad_token_id) == (
        config.bos_token_id, config.pad_token_id)


def test_loaded_checkpoint_reproduces_the_recorded_train_accuracy(smoke):
    """Training used the grouped_mm experts; HF's default (eager loop) must agree. At the
    last checkpoint every cohort has joined, so train accuracy covers the whole split."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, score = smoke.checkpoints[-1], smoke.scores[-1]
    assert (score.step, score.domain) == (6, testbed.ALL_DOMAINS)
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
    other = replace(ONE_STEP, seed=1, checkpoint_steps=(1,))
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
    short = ONE_STEP
    monkeypatch.setattr(testbed.sys, "executable", "false")  # a process that exits with 1
    with pytest.raises(TrainingError, match=r"^testbed training failed \(exit status 1; its "
                                            r"traceback is printed above\); fix what it names "
                                            r"and rerun \(the partial checkpoints in '.*"
                                            r"checkpoints' are replaced\)$"):
        testbed.train(short, tmp_path, log=lambda message: None)
    assert not testbed.is_built(short, tmp_path)


def test_rerun_replaces_step_folders_and_refuses_foreign_content(tmp_path):
    short = ONE_STEP
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
    (dict(heads=4), "head_dim >= 32"),
    (dict(p=12), "p = 12 must be a prime"),
    (dict(domains=(("%", 0.5, (0,)),)), r"domains \('%',\) must be operations of"),
    (dict(domains=(("+", 0.5, (0,)), ("+", 0.6, (0,)))),
     r"domains \('\+', '\+'\) repeat an operation"),
    (dict(domains=()), r"domains \(\) must be operations"),
    (dict(top_k=9), "top_k 9"),
    (dict(batch_size=-1), "batch_size -1 must be >= 0"),
    (dict(domains=(("+", 0.6, (1, 3)),)), r"some domain's first stage must be step 0"),
    (dict(domains=(("-", 0.6, (0, 6)),)), r"- stages \(0, 6\) must be increasing and come "
                                         r"before step 6"),
    (dict(checkpoint_steps=(0, 7)), r"checkpoint_steps \(0, 7\) must be increasing"),
    (dict(checkpoint_steps=(3, 3)), "must be increasing, unique"),
    (dict(domains=(("+", 1.0, (0,)),)), r"train_fraction 1.0 of the 28 \+ split units"),
    (dict(p=3, domains=(("/", 0.1, (0, 3)),)), r"train_fraction 0.1 of the 6 / split units of "
                                               r"p = 3 must leave a training unit per stage "
                                               r"\(2\) and a held-out unit"),
])
def test_invalid_configs_are_named(change, message):
    with pytest.raises(InputError, match=message):
        replace(testbed.SMOKE, **change)


@pytest.mark.parametrize("operation, texts", [
    ("+", ["0 + 0 = 0", "0 + 1 = 1", "0 + 2 = 2", "1 + 0 = 1", "1 + 1 = 2", "1 + 2 = 0",
           "2 + 0 = 2", "2 + 1 = 0", "2 + 2 = 1"]),
    ("-", ["0 - 0 = 0", "0 - 1 = 2", "0 - 2 = 1", "1 - 0 = 1", "1 - 1 = 0", "1 - 2 = 2",
           "2 - 0 = 2", "2 - 1 = 1", "2 - 2 = 0"]),
    ("*", ["0 * 0 = 0", "0 * 1 = 0", "0 * 2 = 0", "1 * 0 = 0", "1 * 1 = 1", "1 * 2 = 2",
           "2 * 0 = 0", "2 * 1 = 2", "2 * 2 = 1"]),
    ("/", ["0 / 1 = 0", "0 / 2 = 0", "1 / 1 = 1", "1 / 2 = 2", "2 / 1 = 2", "2 / 2 = 1"]),
])
def test_examples_of_p_3_are_hand_checked(operation, texts):
    assert [e.text for e in testbed.examples(3, operation)] == texts


def test_a_domain_joining_later_is_trained_and_scored_for_training_from_its_step(tmp_path):
    late = replace(testbed.SMOKE, domains=(("+", 0.6, (0,)), ("*", 0.6, (3,))))
    result = testbed.train(late, tmp_path, log=lambda message: None)
    lines = [json.loads(line) for line in (tmp_path / "samples.jsonl").open()]
    assert {line["introduced_step"] for line in lines if line["domain"] == "mul"} == {3}
    mul = {s.step: s for s in result.scores if s.domain == "mul"}
    assert math.isnan(mul[0].train_accuracy)  # no mul sample trained yet
    assert 0 <= mul[3].train_accuracy <= 1 and 0 <= mul[0].heldout_accuracy <= 1
    memorised = result.rise["mul"].memorised_step
    assert memorised is None or memorised >= 3


def test_the_split_is_seeded_per_domain_and_deals_cohorts_in_turn():
    train, heldout = testbed.split(testbed.SMOKE)
    facts = {d: {(e.a, e.b) for e in train if e.domain == d} for d in ("add", "mul", "sub")}
    assert len(facts["sub"]) == 29  # round(0.6 x 49) facts
    for domain in ("add", "mul"):  # round(0.6 x 28) unordered pairs, both orders kept
        assert len({frozenset(pair) for pair in facts[domain]}) == 17
        assert facts[domain] == {(b, a) for a, b in facts[domain]}
    assert len(heldout) == 3 * 49 - len(train)
    again, _ = testbed.split(testbed.SMOKE)
    assert again == train
    other, _ = testbed.split(replace(testbed.SMOKE, seed=1))
    assert {e.sample_id for e in other} != {e.sample_id for e in train}
    # the mul split does not depend on the add domain being there
    alone, _ = testbed.split(replace(testbed.SMOKE, domains=(("*", 0.6, (0, 3)),)))
    assert alone == [e for e in train if e.domain == "mul"]


def test_every_config_problem_is_named_at_once():
    with pytest.raises(InputError, match="^invalid testbed config: p = 12 must be a prime >= 3; "
                                         ".*top_k 9 must be in 1..experts"):
        replace(testbed.SMOKE, p=12, top_k=9)


def test_a_sample_is_memorised_within_a_margin_of_the_operator_and_operand_floor():
    # of the four predicted tokens (op, b, =, answer) the operator and b are unpredictable
    assert testbed.loss_floor(testbed.DEFAULT) == pytest.approx(
        (math.log(3) + math.log(23)) / 4, abs=1e-12)
    assert testbed.loss_floor(testbed.DEFAULT) == pytest.approx(1.058527, abs=1e-6)
    assert testbed.memorised_loss(testbed.DEFAULT) == pytest.approx(1.108527, abs=1e-6)
    one_domain = replace(testbed.SMOKE, p=37, domains=(("+", 0.5, (0,)),))
    assert testbed.loss_floor(one_domain) == pytest.approx(0.902729, abs=1e-6)  # log(37) / 4


def test_the_demo_compares_each_domains_memorised_samples_with_its_accuracy(tmp_path):
    rise = {name: testbed.DomainRise() for name in testbed.DEFAULT.domain_names}
    result = testbed.TestbedResult(tmp_path, testbed.DEFAULT, [], [], memorised_step=100,
                                   rise=rise, seconds=400.0, steps_per_second=4.6)
    options = testbed.compare_options(result)
    assert (options.group_by, options.memorised_only, options.from_t_star) == (
        "domain", True, True)
    assert options.epsilon == testbed.memorised_loss(testbed.DEFAULT)
    assert options.scores == tmp_path / "scores.csv"
    never = testbed.compare_options(replace(result, memorised_step=None))  # e.g. the smoke run
    assert never == CompareOptions(scores=tmp_path / "scores.csv", group_by="domain")


def test_a_config_survives_its_json_round_trip():
    assert testbed.TestbedConfig.from_dict(json.loads(json.dumps(asdict(testbed.DEFAULT)))) \
        == testbed.DEFAULT
