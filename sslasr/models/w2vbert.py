"""w2v-BERT (Chung et al., 2021): Conformer encoder on log-mel fbank and its two-task objective.

    X (fbank) --feature encoder (4× subsampling)--> Z --LayerNorm--> Ẑ
    Ẑ, masked frames replaced by random vectors --Linear--> first N Conformer blocks --> C
    C --next M Conformer blocks--> M
    Ẑ (unmasked) --Gumbel quantizer--> q_t and its token id(s) y_t
Contrastive task (wav2vec 2.0's): at a masked frame t, c_t must pick q_t among K distractors
from other masked frames of the utterance (cosine similarity, temperature κ):
    L_c = −log  exp(sim(c_t, q_t)/κ) / Σ_{q̃ ∈ {q_t} ∪ Q_t} exp(sim(c_t, q̃)/κ),   plus L_d (diversity)
Masked prediction (BERT's MLM): at a masked frame t, a softmax over M's output predicts y_t:
    L_m = −log p(y_t | m_t)
    L   = β·(L_c + α·L_d) + γ·L_m            (α = 0.1, β = γ = 1)
Fine-tuning uses all N + M blocks as one encoder. `from_hf` imports transformers'
Wav2Vec2BertModel (w2v-BERT 2.0) checkpoints, whose feature encoder stacks frame pairs.
"""

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn
import torch.nn.functional as F

from sslasr.models.blocks.conformer import ConformerConfig, ConformerEncoder
from sslasr.models.blocks.conv_extractor import (
    features_with_grad_scale, lengths_to_padding_mask, padded_to_receptive_field)
from sslasr.models.blocks.dropout import Dropout
from sslasr.models.blocks.masking import channel_mask, masked_frame_index, span_mask
from sslasr.models.blocks.quantizer import GumbelProductQuantizer
from sslasr.models.blocks.subsampling import (
    FeatureProjection, SubsamplingConfig, build_subsampling, normalize_fbank_bins,
)
from sslasr.models.interfaces import EncoderOutput, Stats
from sslasr.models.wav2vec2 import MaskConfig, contrastive_loss, correct_predictions, pretraining_mask


INPUT_NORMS = ("utterance", "none")


@dataclass
class W2vBertEncoderConfig:
    input_dim: int = 80                  # fbank bins
    input_norm: str = "utterance"        # per-utterance, per-bin mean/variance; "none": as stored
    subsampling: SubsamplingConfig = field(default_factory=SubsamplingConfig)
    projection_dropout: float = 0.1
    feature_grad_mult: float = 1.0       # gradient scale into the feature encoder
    conformer: ConformerConfig = field(default_factory=ConformerConfig)
    mask: MaskConfig = field(default_factory=MaskConfig)  # fine-tuning masks, applied in training when > 0

    def __post_init__(self):
        if self.input_norm not in INPUT_NORMS:
            raise ValueError(f"input_norm must be one of {INPUT_NORMS}, got {self.input_norm!r}")

    @classmethod
    def from_dict(cls, d: Dict) -> "W2vBertEncoderConfig":
        d = dict(d)
        d["subsampling"] = SubsamplingConfig(**d.get("subsampling", {}))
        d["conformer"] = ConformerConfig(**d.get("conformer", {}))
        if "mask" in d:
            d["mask"] = MaskConfig(**d["mask"])
        return cls(**d)


class W2vBertEncoder(nn.Module):
    """Input normalisation → feature encoder → LayerNorm + Linear → Conformer blocks."""

    def __init__(self, cfg: W2vBertEncoderConfig):
        super().__init__()
        self.cfg = cfg
        dim = cfg.conformer.dim
        self.feature_extractor = build_subsampling(cfg.input_dim, cfg.subsampling)
        self.feature_projection = FeatureProjection(self.feature_extractor.output_dim, dim, cfg.projection_dropout,
                                                    cfg.conformer.layer_norm_eps)
        self.mask_embedding = nn.Parameter(torch.empty(dim).uniform_())  # fine-tuning time masks
        self.conformer = ConformerEncoder(cfg.conformer)
        self.output_dim = dim

    @property
    def blocks(self) -> nn.ModuleList:
        """The Conformer blocks, bottom first (the interface's block stack)."""
        return self.conformer.layers

    def features(self, fbank: torch.Tensor, lengths: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(B, T, F) fbank → subsampled frames z (B, T', D_z), their lengths and padding mask."""
        if fbank.dim() != 3 or fbank.shape[-1] != self.cfg.input_dim:
            raise ValueError(f"w2v-BERT expects (batch, frames, {self.cfg.input_dim}) fbank features, "
                             f"got shape {tuple(fbank.shape)}")
        if self.cfg.input_norm == "utterance":
            fbank = normalize_fbank_bins(fbank, lengths)
        z = features_with_grad_scale(self.feature_extractor, self.cfg.feature_grad_mult, fbank)
        frame_lengths = self.feature_extractor.output_lengths(lengths)
        return z, frame_lengths, lengths_to_padding_mask(frame_lengths, z.shape[1])

    def forward(self, fbank: torch.Tensor, lengths: torch.Tensor, return_all: bool = False) -> EncoderOutput:
        """Encode for downstream heads. In training, applies the configured fine-tuning masks
        (time spans by the mask embedding, feature channels zeroed) after the projection."""
        fbank = padded_to_receptive_field(fbank, self.feature_extractor.receptive_field)
        z, frame_lengths, padding_mask = self.features(fbank, lengths)
        x = self.feature_projection(z)
        mask = self.cfg.mask
        if self.training and mask.time_prob > 0:
            spans = span_mask(frame_lengths, x.shape[1], mask.time_prob, mask.time_length, mask.time_min_masks)
            x = torch.where(spans.unsqueeze(-1), self.mask_embedding.to(x.dtype), x)
        if self.training and mask.channel_prob > 0:
            dropped = channel_mask(x.shape[0], x.shape[2], mask.channel_prob, mask.channel_length).to(x.device)
            x = x.masked_fill(dropped.unsqueeze(1), 0.0)
        out = self.conformer(x, padding_mask, return_all=return_all)
        if return_all:
            return EncoderOutput(out[-1], frame_lengths, padding_mask, out)
        return EncoderOutput(out, frame_lengths, padding_mask)


@dataclass
class W2vBertPretrainConfig:
    """Defaults from the paper (w2v-BERT XL: 12 + 12 blocks, one codebook of 1024 entries, K = 100
    distractors, α = 0.1, β = γ = 1); where it is silent, wav2vec 2.0's (fairseq) values."""

    contrastive_layers: int = 12        # N; the masked-prediction module is the remaining M blocks
    mask: MaskConfig = field(default_factory=lambda: MaskConfig(time_prob=0.65, time_length=10, time_min_masks=2))
    quantizer_groups: int = 1
    quantizer_entries: int = 1024
    quantizer_dim: int = 256
    quantizer_temperature: Sequence[float] = (2.0, 0.5, 0.999995)
    final_dim: int = 256
    num_negatives: int = 100
    logit_temperature: float = 0.1      # κ
    diversity_weight: float = 0.1       # α
    contrastive_weight: float = 1.0     # β
    mlm_weight: float = 1.0             # γ
    dropout_features: float = 0.0       # on the quantizer's input

    @classmethod
    def from_dict(cls, d: Dict) -> "W2vBertPretrainConfig":
        d = dict(d)
        d["mask"] = pretraining_mask(cls().mask, d.get("mask", {}))
        return cls(**d)


def w2v_bert_loss(contrastive: torch.Tensor, diversity: torch.Tensor, mlm: torch.Tensor,
                  cfg: W2vBertPretrainConfig) -> torch.Tensor:
    """L = β·(L_c + α·L_d) + γ·L_m."""
    return cfg.contrastive_weight * (contrastive + cfg.diversity_weight * diversity) + cfg.mlm_weight * mlm


class W2vBertPretrainer(nn.Module):
    """Encoder + quantizer + contrastive projections + masked-prediction classifier."""

    def __init__(self, encoder_cfg: W2vBertEncoderConfig, cfg: W2vBertPretrainConfig):
        super().__init__()
        layers = encoder_cfg.conformer.layers
        if not 0 < cfg.contrastive_layers < layers:
            raise ValueError(f"contrastive_layers must leave blocks on both sides: 0 < {cfg.contrastive_layers} "
                             f"< conformer.layers = {layers}")
        self.cfg = cfg
        self.encoder = W2vBertEncoder(encoder_cfg)
        feature_dim, dim = self.encoder.feature_extractor.output_dim, encoder_cfg.conformer.dim
        self.dropout_features = Dropout(cfg.dropout_features)
        self.quantizer = GumbelProductQuantizer(feature_dim, cfg.quantizer_groups, cfg.quantizer_entries,
                                                cfg.quantizer_dim, tuple(cfg.quantizer_temperature))
        self.project_q = nn.Linear(cfg.quantizer_dim, cfg.final_dim)
        self.final_proj = nn.Linear(dim, cfg.final_dim)
        self.mlm_proj = nn.Linear(dim, cfg.quantizer_groups * cfg.quantizer_entries)

    def set_num_updates(self, num_updates: int) -> None:
        self.quantizer.set_num_updates(num_updates)

    def forward(self, fbank: torch.Tensor, lengths: torch.Tensor,
                targets: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, Stats]:
        if targets is not None:
            raise ValueError("w2v-BERT learns its own targets (the quantizer); got external targets")
        enc, cfg = self.encoder, self.cfg
        z, frame_lengths, padding_mask = enc.features(fbank, lengths)
        if bool((frame_lengths < 1).any()):  # span masks and contrastive targets need frames
            shortest = int(lengths.min())
            raise ValueError(f"an utterance of {shortest} frames is shorter than the feature encoder's "
                             f"receptive field ({enc.feature_extractor.receptive_field} frames)")
        z = enc.feature_projection.norm(z)
        time_mask = span_mask(frame_lengths, z.shape[1], cfg.mask.time_prob, cfg.mask.time_length,
                              cfg.mask.time_min_masks, at_least_one=True)
        masked_frames = masked_frame_index(time_mask)
        # The paper replaces masked frames by random vectors: N(0, I), the statistics of a
        # LayerNorm output before its affine map.
        masked = torch.where(time_mask.unsqueeze(-1), torch.randn_like(z), z)
        x = enc.feature_projection.dropout(enc.feature_projection.linear(masked))
        conformer, split = enc.conformer, cfg.contrastive_layers
        padding_mask = conformer.blocks_mask(padding_mask)  # once for both runs of blocks
        x = conformer.embed(x, padding_mask)
        context = conformer.run_blocks(x, padding_mask, conformer.layers[:split])
        mlm_states = conformer.run_blocks(context, padding_mask, conformer.layers[split:])

        q = self.quantizer(self.dropout_features(z).flatten(0, 1)[masked_frames])
        contrastive, contrastive_accuracy = contrastive_loss(
            self.final_proj(context.flatten(0, 1)[masked_frames]), self.project_q(q.quantized),
            time_mask.sum(1), cfg.num_negatives, cfg.logit_temperature)
        # token ids: the quantizer's noise-free argmax codes, one per group. fairseq's quantizer
        # targets are the Gumbel-sampled codes instead; the argmax ones do not change with the
        # sampling noise (large at τ ≈ 2, early on), so the MLM module gets steadier targets.
        mlm_logits = self.mlm_proj(mlm_states.flatten(0, 1)[masked_frames]).view(-1, cfg.quantizer_entries).float()
        token_ids = q.codes.reshape(-1)
        mlm = F.cross_entropy(mlm_logits, token_ids)
        loss = w2v_bert_loss(contrastive, q.diversity_loss, mlm, cfg)

        with torch.no_grad():
            mlm_accuracy = correct_predictions(mlm_logits, token_ids).float().mean()
        stats = {
            "loss": loss.detach(),
            "contrastive": contrastive.detach(),
            "diversity": q.diversity_loss.detach(),
            "mlm": mlm.detach(),
            "contrastive_accuracy": contrastive_accuracy,
            "mlm_accuracy": mlm_accuracy,
            "code_perplexity": q.code_perplexity.detach(),
            "prob_perplexity": q.prob_perplexity.detach(),
            "temperature": self.quantizer.temperature,
            "masked_frames": float(len(masked_frames)),
        }
        return loss, stats


# ---------------------------------------------------------------------------------- transformers import
# Wav2Vec2BertModel tensor names (after the `wav2vec2_bert.` prefix of task models) → ours.
W2VBERT_KEY_RULES: List[Tuple[str, str]] = [
    (r"feature_projection\.layer_norm\.(weight|bias)", r"feature_projection.norm.\1"),
    (r"feature_projection\.projection\.(weight|bias)", r"feature_projection.linear.\1"),
    (r"masked_spec_embed", r"mask_embedding"),
    (r"encoder\.layers\.(\d+)\.ffn([12])_layer_norm\.(weight|bias)", r"conformer.layers.\1.ffn\2_norm.\3"),
    (r"encoder\.layers\.(\d+)\.ffn([12])\.intermediate_dense\.(weight|bias)", r"conformer.layers.\1.ffn\2.intermediate.\3"),
    (r"encoder\.layers\.(\d+)\.ffn([12])\.output_dense\.(weight|bias)", r"conformer.layers.\1.ffn\2.output.\3"),
    (r"encoder\.layers\.(\d+)\.self_attn_layer_norm\.(weight|bias)", r"conformer.layers.\1.attention_norm.\2"),
    (r"encoder\.layers\.(\d+)\.self_attn\.linear_(q|k|v|out)\.(weight|bias)", r"conformer.layers.\1.attention.\2_proj.\3"),
    (r"encoder\.layers\.(\d+)\.self_attn\.linear_pos\.weight", r"conformer.layers.\1.attention.pos_proj.weight"),
    (r"encoder\.layers\.(\d+)\.self_attn\.(pos_bias_u|pos_bias_v)", r"conformer.layers.\1.attention.\2"),
    (r"encoder\.layers\.(\d+)\.self_attn\.distance_embedding\.weight",
     r"conformer.layers.\1.attention.distance_embedding.weight"),
    (r"encoder\.layers\.(\d+)\.conv_module\.layer_norm\.(weight|bias)", r"conformer.layers.\1.conv.layer_norm.\2"),
    (r"encoder\.layers\.(\d+)\.conv_module\.pointwise_conv([12])\.weight", r"conformer.layers.\1.conv.pointwise\2.weight"),
    (r"encoder\.layers\.(\d+)\.conv_module\.depthwise_conv\.weight", r"conformer.layers.\1.conv.depthwise.weight"),
    (r"encoder\.layers\.(\d+)\.conv_module\.depthwise_layer_norm\.(weight|bias)", r"conformer.layers.\1.conv.norm.\2"),
    (r"encoder\.layers\.(\d+)\.final_layer_norm\.(weight|bias)", r"conformer.layers.\1.final_norm.\2"),
]
_HF_POSITIONS = {"relative": "relative", "relative_key": "relative_key", None: "none"}
_POINTWISE = re.compile(r"encoder\.layers\.\d+\.conv_module\.pointwise_conv[12]\.weight")


def encoder_config_from_hf(config: Dict) -> W2vBertEncoderConfig:
    """Our encoder config for a transformers Wav2Vec2BertConfig (as a dict): two stacked fbank
    frames, LayerNorm + Linear, Conformer blocks with a causal, bias-free, LayerNorm convolution
    module. What our encoder cannot reproduce is an error; fine-tuning masks are not architecture
    and are left to the recipe's fine-tuning YAML."""
    unsupported = [name for name in ("add_adapter", "use_intermediate_ffn_before_adapter") if config.get(name)]
    if unsupported:
        raise ValueError(f"Wav2Vec2Bert config sets {', '.join(unsupported)}: the adapter after the encoder "
                         "is not supported (import a checkpoint without one)")
    position = config.get("position_embeddings_type", "relative_key")
    if position not in _HF_POSITIONS:
        raise ValueError(f"Wav2Vec2Bert position_embeddings_type={position!r} is not supported; "
                         f"supported: {', '.join(str(p) for p in _HF_POSITIONS)}")
    if config.get("hidden_act", "swish") not in ("swish", "silu"):
        raise ValueError(f"Wav2Vec2Bert hidden_act={config['hidden_act']!r} is not supported (only swish, alias silu)")
    stacked = config.get("feature_projection_input_dim", 160)
    if stacked % 2:
        raise ValueError(f"feature_projection_input_dim={stacked} is not two stacked fbank frames")
    conformer = ConformerConfig(
        dim=config.get("hidden_size", 1024), layers=config.get("num_hidden_layers", 24),
        heads=config.get("num_attention_heads", 16), ffn_dim=config.get("intermediate_size", 4096),
        conv_kernel=config.get("conv_depthwise_kernel_size", 31), conv_norm="layer", conv_causal=True,
        conv_bias=False, position=_HF_POSITIONS[position],
        left_max_position=config.get("left_max_position_embeddings", 64),
        right_max_position=config.get("right_max_position_embeddings", 8),
        dropout=config.get("hidden_dropout", 0.0), attention_dropout=config.get("attention_dropout", 0.0),
        attention_output_dropout=config.get("attention_dropout", 0.0),  # its self_attn_dropout
        activation_dropout=config.get("activation_dropout", 0.0),
        conv_dropout=config.get("conformer_conv_dropout", 0.1), layerdrop=config.get("layerdrop", 0.1),
        layer_norm_eps=config.get("layer_norm_eps", 1e-5))
    return W2vBertEncoderConfig(input_dim=stacked // 2, input_norm="utterance",
                                subsampling=SubsamplingConfig(type="stack", stack=2),
                                projection_dropout=config.get("feat_proj_dropout", 0.0), conformer=conformer)


def from_hf(config: Dict, state_dict: Dict[str, torch.Tensor]) -> Tuple[Dict, Dict[str, torch.Tensor]]:
    """transformers Wav2Vec2BertModel / Wav2Vec2BertForCTC (config.json as a dict, state dict) →
    (our `frontend:` section, W2vBertEncoder state dict). A tensor we cannot place, or an encoder
    tensor the checkpoint lacks, is an error naming them; task heads are skipped and logged."""
    from sslasr.models.hf_import import (  # shared checks
        TASK_HEAD_MODULES, fill_mask_embedding, rename_checked, split_base_model)

    encoder_cfg = encoder_config_from_hf(config)
    base = split_base_model(state_dict, "wav2vec2_bert", TASK_HEAD_MODULES)
    base = {k: v.squeeze(-1) if _POINTWISE.fullmatch(k) else v for k, v in base.items()}  # width-1 Conv1d → Linear
    base = fill_mask_embedding(base, config, encoder_cfg.conformer.dim, default_mask_time_prob=0.05)
    with torch.device("meta"):  # the expected names and shapes, without allocating weights
        expected = W2vBertEncoder(encoder_cfg).state_dict()
    encoder_state = rename_checked(base, W2VBERT_KEY_RULES, expected)
    return {"name": "w2vbert", "encoder": dataclasses.asdict(encoder_cfg)}, encoder_state


__all__: List[str] = ["W2vBertEncoderConfig", "W2vBertEncoder", "W2vBertPretrainConfig", "W2vBertPretrainer",
                      "w2v_bert_loss", "encoder_config_from_hf", "from_hf", "W2VBERT_KEY_RULES"]
