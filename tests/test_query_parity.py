"""Mask2Former parity of the query stack (docs/query_stack.md, "Parity with Mask2Former"): inference
order, zero padding of point sampling, weight-decay rules, fp32 pixel decoder under autocast, and
initialisation. Each test compares with a hand computation or the reference's stated rule."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from zeroseg.build import build_run
from zeroseg.methods.base import weight_decay_exempt_parameters
from zeroseg.methods.query_baseline import QueryBaseline
from zeroseg.models.pixel_decoders import MSDeformPixelDecoder
from zeroseg.models.query_decoders import Mask2FormerDecoder, QueryHeads, QueryPrediction
from zeroseg.toolkit.matching import HungarianMatcher, SetCriterion, Targets, point_sample, semantic_inference


# -- 1. inference order ------------------------------------------------------------------------------
def _upsample_1x2_to_1x4_by_hand(values: torch.Tensor) -> torch.Tensor:
    """Bilinear 2 → 4 along the last axis, align_corners=False (half-pixel centres, edges clamped):
    output x samples the input at (x + 0.5)·2/4 − 0.5 = −0.25, 0.25, 0.75, 1.25."""
    a, b = values[..., 0], values[..., 1]
    return torch.stack([a, 0.75 * a + 0.25 * b, 0.25 * a + 0.75 * b, b], dim=-1)


def _two_query_problem() -> tuple[torch.Tensor, torch.Tensor]:
    class_logits = torch.tensor([[[2.0, 0.0, -1.0], [-1.0, 1.5, 0.0]]])  # (1, Q=2, K=2 + no object)
    mask_logits = torch.tensor([[[[-6.0, 6.0]], [[5.0, -5.0]]]])  # (1, 2, 1, 2): sharp masks, so the order matters
    return class_logits, mask_logits


def test_semantic_inference_upsamples_mask_logits_before_the_sigmoid_by_default() -> None:
    class_logits, mask_logits = _two_query_problem()
    probs = class_logits[0].softmax(-1)[:, :2]  # (Q, K)
    upsampled = _upsample_1x2_to_1x4_by_hand(mask_logits[0, :, 0])  # (Q, 4) logits at the output size
    reference_order = torch.einsum("qk,qx->kx", probs, upsampled.sigmoid())  # Mask2Former: upsample, sigmoid, Σ
    scores = semantic_inference(class_logits, mask_logits, (1, 4))
    torch.testing.assert_close(scores[0, :, 0], reference_order)
    score_first = _upsample_1x2_to_1x4_by_hand(torch.einsum("qk,qx->kx", probs, mask_logits[0, :, 0].sigmoid()))
    torch.testing.assert_close(semantic_inference(class_logits, mask_logits, (1, 4), "score_first")[0, :, 0], score_first)
    # the two orders differ on the interpolated pixels of this input
    assert float((reference_order - score_first).abs().max()) > 0.1


def test_query_baseline_scores_at_the_input_size_in_the_configured_order() -> None:
    class_logits, mask_logits = _two_query_problem()
    images = torch.zeros(1, 3, 1, 4)  # the mask logits are at 1/4 of the width
    fake = SimpleNamespace(
        predictions=lambda x, e: [QueryPrediction(class_logits, mask_logits)], inference_order="upsample_first"
    )
    probs = class_logits[0].softmax(-1)[:, :2]
    expected = torch.einsum("qk,qx->kx", probs, _upsample_1x2_to_1x4_by_hand(mask_logits[0, :, 0]).sigmoid())
    torch.testing.assert_close(QueryBaseline.predict_logits(fake, images, torch.zeros(2, 8))[0, :, 0], expected)
    fake.inference_order = "score_first"
    expected = _upsample_1x2_to_1x4_by_hand(torch.einsum("qk,qx->kx", probs, mask_logits[0, :, 0].sigmoid()))
    torch.testing.assert_close(QueryBaseline.predict_logits(fake, images, torch.zeros(2, 8))[0, :, 0], expected)
    with pytest.raises(ValueError, match=r"inference_order='nearest' is not one of \['upsample_first', 'score_first'\]"):
        semantic_inference(class_logits, mask_logits, (1, 4), "nearest")  # type: ignore[arg-type]


# -- 2. point sampling padding -----------------------------------------------------------------------
def test_point_sample_zero_pads_by_default_and_border_pads_as_option() -> None:
    values = torch.tensor([[[[2.0, 4.0], [6.0, 8.0]]]])  # (1, 1, 2, 2)
    # x = 0.1 → pixel coordinate 0.1·2 − 0.5 = −0.3: 0.7 of column 0, 0.3 of the padding column −1;
    # y = 0.25 → pixel coordinate 0: exactly row 0
    point = torch.tensor([[[0.1, 0.25]]])
    assert float(point_sample(values, point)) == pytest.approx(0.7 * 2.0 + 0.3 * 0.0)  # detectron2: zero padding
    assert float(point_sample(values, point, "border")) == pytest.approx(2.0)  # the edge value


def _points_at(x: float, y: float):
    def fake_rand(*shape, device=None, **_):
        return torch.tensor([x, y]).expand(*shape).clone()

    return fake_rand


def test_matcher_and_criterion_sample_with_the_configured_padding(monkeypatch: pytest.MonkeyPatch) -> None:
    # every sampled point at x = 0.1, y = 0.5 of a 2x2 map: 0.7 · value (zeros) or the value (border)
    monkeypatch.setattr(torch, "rand", _points_at(0.1, 0.5))
    logit = 2.0
    mask_logits = torch.full((1, 1, 2, 2), logit)
    targets = Targets([torch.tensor([0])], [torch.ones(1, 2, 2)])
    class_logits = torch.zeros(1, 1, 2)

    def bce(x: float, t: float) -> float:
        return F.softplus(torch.tensor(x)).item() - x * t

    for mode, scale in (("zeros", 0.7), ("border", 1.0)):
        terms = HungarianMatcher(num_points=4, padding_mode=mode).cost_terms(class_logits, mask_logits, targets)
        assert float(terms["mask"][0, 0, 0]) == pytest.approx(bce(scale * logit, scale)), mode
        criterion = SetCriterion(HungarianMatcher(num_points=4), num_points=4, padding_mode=mode)
        losses = criterion.layer_losses(class_logits, mask_logits, targets, [(torch.tensor([0]), torch.tensor([0]))], 1.0)
        assert float(losses["mask"]) == pytest.approx(5.0 * bce(scale * logit, scale)), mode
    with pytest.raises(ValueError, match=r"method.matcher.padding_mode='reflect' is not one of \['zeros', 'border'\]"):
        HungarianMatcher(padding_mode="reflect")  # type: ignore[arg-type]


# -- 4. weight decay -----------------------------------------------------------------------------------
class _Zoo(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 4)
        self.conv = nn.Conv2d(4, 4, 1, bias=False)
        self.layer_norm = nn.LayerNorm(4)
        self.group_norm = nn.GroupNorm(2, 4)
        self.batch_norm = nn.BatchNorm2d(4)
        self.embedding = nn.Embedding(3, 4)
        self.attention = nn.MultiheadAttention(4, 2)
        self.matrix = nn.Parameter(torch.zeros(3, 4))  # a raw parameter (like the pixel decoder's level embedding)
        self.vector = nn.Parameter(torch.zeros(4))  # a raw 1-d parameter (like the no-object embedding)


_NORM = ["layer_norm.weight", "layer_norm.bias", "group_norm.weight", "group_norm.bias", "batch_norm.weight", "batch_norm.bias"]
_BIAS = [
    "linear.bias",
    "layer_norm.bias",
    "group_norm.bias",
    "batch_norm.bias",
    "attention.in_proj_bias",
    "attention.out_proj.bias",
]


@pytest.mark.parametrize(
    "rules,expected",
    [
        (["norm", "embedding"], [*_NORM, "embedding.weight"]),  # Mask2Former
        (["norm", "bias"], sorted(set(_NORM) | set(_BIAS))),  # SegFormer/mmseg
        ([], []),
    ],
)
def test_weight_decay_exemptions_name_exactly_the_rules_parameters(rules: list[str], expected: list[str]) -> None:
    zoo = _Zoo()
    exempt = weight_decay_exempt_parameters(zoo, rules)
    assert sorted(n for n, p in zoo.named_parameters() if id(p) in exempt) == sorted(expected)


def test_query_baseline_uses_mask2formers_weight_decay_rule_and_unknown_rules_fail(make_cfg) -> None:
    cfg = make_cfg(["method=query_baseline"])
    model = build_run(cfg, with_callbacks=False)["model"]
    decay = cfg.method.optimizer.weight_decay
    by_id = {id(p): g["weight_decay"] for g in model.parameter_groups() for p in g["params"]}
    owners = {}
    for module_name, module in model.named_modules():
        for name, parameter in module.named_parameters(recurse=False):
            owners.setdefault(id(parameter), (f"{module_name}.{name}", module))
    norm_types = (nn.BatchNorm2d, nn.GroupNorm, nn.LayerNorm)  # the norms of resnet10t + the query stack
    for name, parameter in model.named_parameters():
        if name.startswith("teacher."):
            continue
        _, module = owners[id(parameter)]
        exempt = isinstance(module, (*norm_types, nn.Embedding))
        assert by_id[id(parameter)] == (0.0 if exempt else decay), name
    # spot checks named after Mask2Former's build_optimizer: embeddings and norms exempt, biases and raw parameters decay
    named = dict(model.named_parameters())
    for name in (
        "segmenter.decoder.query_feat.weight",
        "segmenter.decoder.query_pos.weight",
        "segmenter.decoder.level_embed.weight",
        "segmenter.decoder.heads.norm.weight",
        "segmenter.pixel_decoder.input_proj.0.1.bias",
    ):
        assert by_id[id(named[name])] == 0.0, name
    for name in (
        "segmenter.pixel_decoder.level_embed",
        "segmenter.decoder.heads.no_object_embedding",
        "segmenter.decoder.cross.0.attn.in_proj_bias",
        "segmenter.pixel_decoder.mask_features.bias",
    ):
        assert by_id[id(named[name])] == decay, name
    bad = make_cfg(["method=query_baseline", "method.weight_decay_exempt=[norm,biases]"], subdir="bad")
    with pytest.raises(
        ValueError,
        match=r"method.weight_decay_exempt has unknown rule\(s\) \['biases'\]: allowed values are "
        r"\['bias', 'embedding', 'norm'\]",
    ):
        build_run(bad, with_callbacks=False)


# -- 5. precision -------------------------------------------------------------------------------------
def test_pixel_decoder_runs_in_fp32_under_bf16_autocast() -> None:
    torch.manual_seed(0)
    channels, strides = [8, 16, 24, 32], [4, 8, 16, 32]
    decoder = MSDeformPixelDecoder(channels, strides, dim=32, mask_dim=16, encoder_layers=1, heads=4, ffn_dim=32).eval()
    features = [torch.randn(1, c, 64 // s, 64 // s).bfloat16() for c, s in zip(channels, strides)]
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        mask_features, multi_scale = decoder(features)
        assert torch.nn.Linear(4, 4)(torch.randn(1, 4)).dtype == torch.bfloat16  # autocast is on around it
    assert mask_features.dtype == torch.float32 and all(m.dtype == torch.float32 for m in multi_scale)
    with torch.no_grad():  # the same inputs in fp32 without autocast: identical in fp32
        expected_mask_features, expected_multi_scale = decoder([f.float() for f in features])
    torch.testing.assert_close(mask_features, expected_mask_features)
    for got, expected in zip(multi_scale, expected_multi_scale):
        torch.testing.assert_close(got, expected)


# -- 3. initialisation --------------------------------------------------------------------------------
def _assert_uniform(weight: torch.Tensor, bound: float, name: str) -> None:
    """All values in [−bound, bound] and spread over it (max ≥ 0.95·bound, std ≈ bound/√3)."""
    weight = weight.detach()
    values = weight.abs()
    assert float(values.max()) <= bound + 1e-6, f"{name}: max {float(values.max()):.4f} > bound {bound:.4f}"
    assert float(values.max()) >= 0.95 * bound, f"{name}: max {float(values.max()):.4f} << bound {bound:.4f}"
    assert float(weight.std()) == pytest.approx(bound / math.sqrt(3), rel=0.1), name


def test_pixel_decoder_initialisation_follows_mask2former() -> None:
    torch.manual_seed(0)
    channels, strides = [32, 64, 96, 128], [4, 8, 16, 32]
    decoder = MSDeformPixelDecoder(
        channels, strides, dim=128, mask_dim=64, encoder_layers=2, heads=4, ffn_dim=256
    ).requires_grad_(False)
    # level embeddings: normal_ (std 1), a raw parameter as in MSDeformAttnTransformerEncoderOnly
    assert isinstance(decoder.level_embed, nn.Parameter) and decoder.level_embed.shape == (3, 128)
    assert float(decoder.level_embed.std()) == pytest.approx(1.0, abs=0.12)
    for projection in decoder.input_proj:  # nn.Conv2d(..., kernel_size=1) with bias, Xavier gain 1, zero bias
        conv = projection[0]
        assert conv.bias is not None and float(conv.bias.abs().max()) == 0.0
        _assert_uniform(conv.weight, math.sqrt(6.0 / (conv.in_channels + conv.out_channels)), "input_proj")
    for layer in decoder.encoder:  # FFN weights Xavier; MSDeformAttn keeps its own rule
        for linear in (layer.ffn[0], layer.ffn[3]):
            _assert_uniform(linear.weight, math.sqrt(6.0 / (linear.in_features + linear.out_features)), "encoder ffn")
        assert float(layer.attn.attention_weights.weight.abs().max()) == 0.0
        assert float(layer.attn.sampling_offsets.weight.abs().max()) == 0.0
        ring = layer.attn.sampling_offsets.bias.view(4, 3, 4, 2)  # heads, levels, points, xy
        torch.testing.assert_close(ring[0, 0, :, 0], torch.tensor([1.0, 2.0, 3.0, 4.0]))  # head 0 points along +x
    # c2_xavier_fill: kaiming_uniform_(a=1) = uniform(±sqrt(3 / fan_in)), zero bias
    for conv in (decoder.lateral[0][0], decoder.output[0][0], decoder.mask_features):
        _assert_uniform(conv.weight, math.sqrt(3.0 / conv.weight[0].numel()), "c2_xavier_fill")
    assert float(decoder.mask_features.bias.abs().max()) == 0.0


def test_decoder_attention_and_ffn_weights_are_xavier_uniform() -> None:
    torch.manual_seed(0)
    dim, ffn_dim = 128, 512
    decoder = Mask2FormerDecoder(QueryHeads(dim, dim, 16), dim, dim, heads=4, layers=2, ffn_dim=ffn_dim, num_queries=10)
    decoder.requires_grad_(False)
    for layer in [*decoder.cross, *decoder.self_attn]:
        # nn.MultiheadAttention's packed (3·dim, dim) input projection is one matrix: bound sqrt(6 / (dim + 3·dim))
        _assert_uniform(layer.attn.in_proj_weight, math.sqrt(6.0 / (4 * dim)), "in_proj_weight")
        _assert_uniform(layer.attn.out_proj.weight, math.sqrt(6.0 / (2 * dim)), "out_proj")
    for layer in decoder.ffn:
        _assert_uniform(layer.ffn[0].weight, math.sqrt(6.0 / (dim + ffn_dim)), "ffn.0")
        _assert_uniform(layer.ffn[3].weight, math.sqrt(6.0 / (dim + ffn_dim)), "ffn.3")
    for embedding in (decoder.query_feat, decoder.query_pos, decoder.level_embed):  # nn.Embedding: N(0, 1)
        assert isinstance(embedding, nn.Embedding)
        assert float(embedding.weight.std()) == pytest.approx(1.0, abs=0.12)


# -- ignore pixels in the mask losses (an option; Mask2Former's default treats them as background) -----
def _pixel_centres_of_2x2(*shape: int, **_: object) -> torch.Tensor:
    """``torch.rand`` stand-in: the four pixel centres of a 2x2 map, (x, y) in [0, 1], tiled."""
    centres = torch.tensor([[0.25, 0.25], [0.75, 0.25], [0.25, 0.75], [0.75, 0.75]])
    return centres.repeat(shape[1] // 4, 1).expand(shape[0], -1, -1).clone()


@pytest.mark.parametrize("ignore_pixels", ["background", "exclude"])
def test_ignore_pixels_are_background_or_left_out_of_the_mask_costs_and_losses(monkeypatch, ignore_pixels: str) -> None:
    from zeroseg.toolkit.matching import targets_from_labels

    monkeypatch.setattr(torch, "rand", _pixel_centres_of_2x2)
    labels = torch.tensor([[[0, 255], [0, 255]]])  # the right column is ignore (an unseen region)
    targets = targets_from_labels(labels, 255)
    logits = [[2.0, -1.0], [1.0, 3.0]]  # row-major: (x=0,y=0), (x=1,y=0), (x=0,y=1), (x=1,y=1)
    mask_logits = torch.tensor([[logits]])
    pixels = [(2.0, 1.0), (-1.0, 0.0), (1.0, 1.0), (3.0, 0.0)]  # (logit, target) at the four centres
    if ignore_pixels == "exclude":
        pixels = [pixels[0], pixels[2]]  # the ignore column leaves the sums
    bce = sum(F.softplus(torch.tensor(x)).item() - x * t for x, t in pixels) / len(pixels)
    probs = [torch.sigmoid(torch.tensor(x)).item() for x, _ in pixels]
    dice = 1 - (2 * sum(p * t for p, (_, t) in zip(probs, pixels)) + 1) / (sum(probs) + sum(t for _, t in pixels) + 1)

    matcher = HungarianMatcher(num_points=4, ignore_pixels=ignore_pixels)
    terms = matcher.cost_terms(torch.zeros(1, 1, 2), mask_logits, targets)
    assert float(terms["mask"][0, 0, 0]) == pytest.approx(bce, rel=1e-5)
    assert float(terms["dice"][0, 0, 0]) == pytest.approx(dice, rel=1e-5)
    criterion = SetCriterion(matcher, num_points=4, oversample_ratio=1.0, importance_ratio=0.0, ignore_pixels=ignore_pixels)
    losses = criterion.layer_losses(None, mask_logits, targets, [(torch.tensor([0]), torch.tensor([0]))], 1.0)
    assert float(losses["mask"]) == pytest.approx(5.0 * bce, rel=1e-5)
    assert float(losses["dice"]) == pytest.approx(5.0 * dice, rel=1e-5)


def test_unknown_ignore_pixels_option_names_the_key() -> None:
    with pytest.raises(ValueError, match=r"method.criterion.ignore_pixels='drop' is not one of \['background', 'exclude'\]"):
        SetCriterion(HungarianMatcher(), ignore_pixels="drop")  # type: ignore[arg-type]
