"""Tiny random-weight MoE checkpoints of real architectures, built locally.

Model weights cannot be downloaded here, so tests, the demo and benchmarks build
their own Hugging Face checkpoints with transformers plus a byte-level BPE
tokenizer trained locally with ``tokenizers``. Both transformers and vLLM load
the saved folder.

Router scaling: transformers initialises router (gate) weights with std 0.02,
which on a hidden state of unit RMS gives logits of std ~0.02*sqrt(hidden):
almost uniform gates and meaningless pathways. :func:`build_toy_model` redraws
every router matrix with std ``ROUTER_LOGIT_STD / sqrt(hidden)``, so router
logits have a standard deviation of about ``ROUTER_LOGIT_STD`` (2.0): routing
is peaked but not one-hot, like a trained model's. Routers that select by
sigmoid scores plus a load-balancing bias (``glm4moe``, DeepSeek-V3 style) get
a random bias of std ``CORRECTION_BIAS_STD`` (transformers initialises it to 0),
so the bias changes which experts are chosen. Everything is deterministic for a
given seed.

Example::

    path = build_toy_model("toy-olmoe", arch="olmoe", preset="tiny", seed=0)
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

from .errors import InputError

ROUTER_LOGIT_STD = 2.0
CORRECTION_BIAS_STD = 0.1  # sigmoid scores of logits with std 2 differ by ~0.1-0.2
VOCAB_SIZE = 512
SPECIAL_TOKENS = ("<|endoftext|>", "<|pad|>")
ARCHITECTURES = ("olmoe", "mixtral", "qwen2moe", "glm4moe")


@dataclass(frozen=True)
class ToyShape:
    """Model shape of a preset. head_dim = hidden / heads must be >= 64 for vLLM CPU."""

    hidden: int
    layers: int
    heads: int
    experts: int
    top_k: int
    intermediate: int


PRESETS = {
    "tiny": ToyShape(hidden=128, layers=4, heads=2, experts=16, top_k=4, intermediate=128),
    # OLMoE's routing shape (16 MoE layers, 64 experts, top-8) at small width.
    "olmoe-shaped": ToyShape(hidden=256, layers=16, heads=4, experts=64, top_k=8, intermediate=128),
}

_WORDS = (  # noqa: SIM905 (a word list reads better as one string)
    "the a of to and in is it that for on with as was at by an be this from or are have "
    "model expert layer token route path memory learn train test data sample group step "
    "mixture sparse dense gate weight router compute sum mean loss accuracy checkpoint "
    "red blue green small large fast slow early late first last new old high low open "
    "cat dog bird fish tree river stone cloud light dark music number letter word page "
    "one two three four five six seven eight nine ten zero plus minus equals times "
    "run walk read write build find keep move turn grow fall rise meet share hold"
).split()


def corpus(num_lines: int, seed: int = 0) -> list[str]:
    """Deterministic pseudo-English lines (4-24 words) for tokenizer training and samples."""
    rng = random.Random(seed)
    return [
        " ".join(rng.choice(_WORDS) for _ in range(rng.randint(4, 24))).capitalize() + "."
        for _ in range(num_lines)
    ]


def train_tokenizer(vocab_size: int = VOCAB_SIZE, seed: int = 0):
    """A byte-level BPE ``PreTrainedTokenizerFast`` trained on :func:`corpus` (no downloads).

    Byte-level, so every string is encodable (no unknown tokens).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(corpus(4000, seed), trainer=trainer)
    eos, pad = SPECIAL_TOKENS
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token=eos, eos_token=eos, pad_token=pad
    )


def toy_config(arch: str, shape: ToyShape, vocab_size: int):
    """The transformers config of ``arch`` with ``shape`` (float32 weights, untied embeddings)."""
    common = dict(
        vocab_size=vocab_size,
        hidden_size=shape.hidden,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.heads,
        max_position_embeddings=4096,
        num_experts_per_tok=shape.top_k,
        tie_word_embeddings=False,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=1,
    )
    if arch == "olmoe":
        from transformers import OlmoeConfig

        return OlmoeConfig(
            **common, num_experts=shape.experts, intermediate_size=shape.intermediate
        )
    if arch == "mixtral":
        from transformers import MixtralConfig

        return MixtralConfig(
            **common, num_local_experts=shape.experts, intermediate_size=shape.intermediate
        )
    if arch == "qwen2moe":
        from transformers import Qwen2MoeConfig

        return Qwen2MoeConfig(
            **common,
            num_experts=shape.experts,
            intermediate_size=shape.intermediate,
            moe_intermediate_size=shape.intermediate,
            shared_expert_intermediate_size=shape.intermediate,
            decoder_sparse_step=1,
            mlp_only_layers=[],
        )
    if arch == "glm4moe":  # DeepSeek-V3-style routing: sigmoid scores plus a selection bias
        from transformers import Glm4MoeConfig

        return Glm4MoeConfig(
            **common,
            n_routed_experts=shape.experts,
            head_dim=shape.hidden // shape.heads,  # vLLM reads it; GLM-4.5's configs have it
            intermediate_size=shape.intermediate,
            moe_intermediate_size=shape.intermediate,
            n_shared_experts=1,
            first_k_dense_replace=1,  # layer 0 dense, as GLM-4.5's first layers
            n_group=1,
            topk_group=1,
            norm_topk_prob=True,
            routed_scaling_factor=2.5,  # GLM-4.5's: gate weights sum to 2.5
        )
    raise InputError(f"unknown toy architecture {arch!r}; choose one of {', '.join(ARCHITECTURES)}")


def router_parameters(model, num_experts: int) -> list:
    """The router (gate) weight of every MoE layer, in layer order: tensors [E, hidden].

    Matches parameters named ``...gate.weight`` with E rows; Qwen2-MoE's
    one-row ``shared_expert_gate`` is excluded by its shape.
    """
    return [
        p
        for name, p in model.named_parameters()
        if name.endswith("gate.weight") and p.ndim == 2 and p.shape[0] == num_experts
    ]


def correction_biases(model) -> list:
    """The selection bias (``e_score_correction_bias``, float32 [E]) of every MoE layer of
    a DeepSeek-V3-style router, in layer order; [] for other routers."""
    return [b for name, b in model.named_buffers() if name.endswith("e_score_correction_bias")]


def build_toy_model(
    out: str | Path, arch: str = "olmoe", preset: str = "tiny", seed: int = 0
) -> Path:
    """Build, save and return the folder of a random toy MoE checkpoint plus its tokenizer.

    Args:
        out: target folder (created; existing model files are overwritten).
        arch: one of :data:`ARCHITECTURES`.
        preset: one of :data:`PRESETS`.
        seed: seeds the weights; same seed, same bytes. The tokenizer is the same for
            every seed, so toys of one shape behave like checkpoints of one run.
    """
    import torch

    if preset not in PRESETS:
        raise InputError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    shape = PRESETS[preset]
    tokenizer = train_tokenizer()  # one tokenizer for every seed: seeds are like checkpoints
    config = toy_config(arch, shape, vocab_size=len(tokenizer))
    model = _init_model(config, seed)
    with torch.no_grad():
        generator = torch.Generator().manual_seed(seed + 1)
        for weight in router_parameters(model, shape.experts):
            weight.copy_(torch.randn(weight.shape, generator=generator))
            weight.mul_(ROUTER_LOGIT_STD / shape.hidden**0.5)
        for bias in correction_biases(model):
            bias.copy_(torch.randn(bias.shape, generator=generator) * CORRECTION_BIAS_STD)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def _init_model(config, seed: int):
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
