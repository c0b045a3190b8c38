"""Expected checkpoint layouts of three pathology foundation models, taken from published facts.

The point of this module is that it does NOT import timm or torch: every name and shape below
is generated from hyperparameters that the model owners published (Hugging Face model cards /
config.json ``model_args``, the owners' own loading code) and checked against parameter counts
that were published or printed by public code. A test can then build the timm architecture on the
``meta`` device and compare ``model.state_dict()`` with :func:`expected_state_dict_shapes`; if
they agree key-for-key and shape-for-shape, a user's downloaded ``pytorch_model.bin`` will load
with ``strict=True``.

Conventions used in the comments:

* ``FACT``      -- quoted/paraphrased from the cited public source.
* ``DERIVED``   -- arithmetic on FACTs (e.g. 224 // 16 = 14 patches per side).
* ``INFERENCE`` -- a conclusion that is not stated verbatim anywhere we could read; the reasoning
                   is given so that a reviewer can re-check it. Nothing here was copied from a
                   timm build; timm was used only afterwards as a cross-check.

No checkpoint file was available (no network, gated repos), so no key list below was read off a
real ``pytorch_model.bin``. What ties the layout to the real files is (a) the owners' published
``timm.create_model(...) ; load_state_dict(..., strict=True)`` recipes and (b) exact published
parameter counts (see ``PUBLISHED_PARAMETER_COUNTS``), which pin the shapes of cls/reg/pos
tokens, LayerScale and the MLP width.

Limitation worth knowing: a state dict cannot reveal ``num_heads`` (``attn.qkv.weight`` is
``[3*D, D]`` for any head count), nor the activation (GELU vs SiLU). Tests should check
``blocks[i].attn.num_heads`` and the MLP activation class separately; the published values are
recorded in ``ARCHITECTURES``.
"""

from __future__ import annotations

from math import prod

__all__ = [
    "ARCHITECTURES",
    "MODEL_NAMES",
    "PREPROCESSING",
    "PUBLISHED_PARAMETER_COUNTS",
    "RECOMMENDED_EMBEDDING",
    "SOURCES",
    "derived_parameter_count",
    "expected_state_dict_shapes",
]

MODEL_NAMES = ("uni", "virchow2", "gigapath", "uni2_h", "virchow", "phikon", "phikon_v2", "hoptimus0", "hoptimus1",
               "conch_v15", "lunit_vits8")
# Saved by Hugging Face transformers (names renamed into timm's on loading: hepatoquant.checkpoint_layouts).
TRANSFORMERS_CHECKPOINTS = {"phikon": "transformers_vit", "phikon_v2": "transformers_dinov2"}

# --------------------------------------------------------------------------------------------
# Sources (short keys used in the comments below).
# --------------------------------------------------------------------------------------------
SOURCES: dict[str, str] = {
    # UNI
    "uni_readme": (
        "https://github.com/mahmoodlab/UNI/blob/main/README_old.md (section '2. Downloading "
        "weights + Creating model'); same recipe on https://huggingface.co/MahmoodLab/UNI"
    ),
    "uni_get_encoder": "https://github.com/mahmoodlab/UNI/blob/main/uni/get_encoder/get_encoder.py",
    "uni_hf_config": (
        "https://huggingface.co/MahmoodLab/UNI/blob/main/config.json -- not readable here (gated); "
        "its contents are known only as reproduced verbatim in third-party code (e.g. TileFeature"
        "Extractor/FeatureExtractor classes that embed {'tag': 'uni_mass100k', ...})"
    ),
    "trident": (
        "https://github.com/mahmoodlab/TRIDENT/blob/main/trident/patch_encoder_models/load.py "
        "(UNIInferenceEncoder, Virchow2InferenceEncoder, GigaPathInferenceEncoder: each does "
        "timm.create_model(...) then load_state_dict(torch.load('pytorch_model.bin'), strict=True))"
    ),
    "uni_paper": "Chen et al., Nat Med 2024, https://doi.org/10.1038/s41591-024-02857-3",
    # Virchow2
    "virchow2_card": (
        "https://huggingface.co/paige-ai/Virchow2 model card (README.md): 'Model Stats: Params (M): "
        "632, Image size: 224 x 224; Architecture: ViT-H/14, Patch size: 14, Layers: 32, Embedding "
        "dimension: 1280, Activation function: SwiGLU, Attention heads: 16, LayerScale: true, "
        "Register tokens: 4' and the usage snippet (output 1 x 261 x 1280; class_token = "
        "output[:, 0]; patch_tokens = output[:, 5:] 'tokens 1-4 are register tokens so we ignore "
        "them'; embedding = cat([class_token, patch_tokens.mean(1)]) 1 x 2560). The card itself is "
        "gated; the text was read from copies of it in public code/search excerpts."
    ),
    "virchow2_hf_config": (
        "https://huggingface.co/paige-ai/Virchow2/blob/main/config.json, as reproduced in public "
        "code labelled 'Model configuration from JSON': architecture vit_huge_patch14_224, "
        "model_args {img_size: 224, init_values: 1e-5, num_classes: 0, reg_tokens: 4, mlp_ratio: "
        "5.3375, global_pool: '', dynamic_img_size: true}, pretrained_cfg {tag: virchow_v2, "
        "input_size: [3,224,224], interpolation: bicubic, crop_pct: 1.0, crop_mode: center, "
        "mean: [0.485,0.456,0.406], std: [0.229,0.224,0.225], license: CC-BY-NC-ND-4.0}"
    ),
    "virchow2_paper": (
        "Zimmermann et al., 'Virchow2: Scaling Self-Supervised Mixed Magnification Models in "
        "Pathology', arXiv:2408.00738 ('Virchow2, a 632 million parameter vision transformer')"
    ),
    # Prov-GigaPath
    "gigapath_readme": (
        "https://github.com/prov-gigapath/prov-gigapath/blob/main/README.md ('Inference with the "
        "tile encoder') and https://huggingface.co/prov-gigapath/prov-gigapath model card"
    ),
    "gigapath_hf_config": (
        "https://huggingface.co/prov-gigapath/prov-gigapath/blob/main/config.json, as reproduced "
        "in public code (gig_config dicts): architecture vit_giant_patch14_dinov2, num_features "
        "1536, global_pool token, model_args {img_size: 224, in_chans: 3, patch_size: 16, "
        "embed_dim: 1536, depth: 40, num_heads: 24, init_values: 1e-05, mlp_ratio: 5.33334, "
        "num_classes: 0}"
    ),
    "gigapath_notebook": (
        "https://github.com/prov-gigapath/prov-gigapath/blob/main/demo/run_gigapath.ipynb, cell 3 "
        "output 'Tile encoder param # 1134953984' (printed by gigapath/pipeline.py "
        "load_tile_slide_encoder: sum(p.numel() for p in tile_encoder.parameters()) after "
        "timm.create_model('hf_hub:prov-gigapath/prov-gigapath', pretrained=True)); cell 4 output "
        "'tile_encoder_outputs[tile_embeds].shape: torch.Size([810, 1536])'"
    ),
    "gigapath_pipeline": "https://github.com/prov-gigapath/prov-gigapath/blob/main/gigapath/pipeline.py",
    # The encoder zoo (issue 21)
    "trident_zoo": (
        "mahmoodlab/TRIDENT trident/patch_encoder_models/load.py (commit 0120b8bf): UNIv2InferenceEncoder "
        "(timm vit_giant_patch14_224, img_size 224, patch_size 14, depth 24, num_heads 24, init_values 1e-5, "
        "embed_dim 1536, mlp_ratio 2.66667*2, num_classes 0, no_embed_class True, SwiGLUPacked, SiLU, reg_tokens 8, "
        "dynamic_img_size True; 'download the required pytorch_model.bin from huggingface.co/MahmoodLab/UNI2-h'; "
        "ImageNet mean/std; bf16); VirchowInferenceEncoder (vit_huge_patch14_224, img_size 224, init_values 1e-5, "
        "num_classes 0, mlp_ratio 5.3375, global_pool '', dynamic_img_size True, SwiGLUPacked, SiLU; embedding "
        "cat([output[:, 0], output[:, 1:].mean(1)]); fp16; pytorch_model.bin); PhikonInferenceEncoder "
        "(ViTModel.from_pretrained('owkin/phikon', add_pooling_layer=False), last_hidden_state[:, 0, :]); "
        "Phikonv2InferenceEncoder (AutoModel 'owkin/phikon-v2', last_hidden_state[:, 0, :], ImageNet, fp32); "
        "hoptimus0 / hoptimus1 (vit_giant_patch14_reg4_dinov2, num_classes 0, img_size 224, global_pool token, "
        "init_values 1e-5, dynamic_img_size True; H-optimus mean/std; fp16; pytorch_model.bin)"
    ),
    "pfmseg_zoo": (
        "lingxitong/PFM_Segmentation models/pfm_seg_models.py and README: names uni_v2, virchow_v1, phikon, "
        "phikon_v2, hoptimus_0, hoptimus_1 built as TRIDENT does (strict loads), patch tokens after skipping 9 "
        "(uni_v2), 5 (hoptimus) and 1 (virchow_v1, phikon*) prefix tokens; README table: Phikon 85.8M, "
        "Virchow 632M, Phikon-v2 300M; data/transforms.py: H-optimus mean/std for hoptimus_0/1, ImageNet otherwise"
    ),
    "uni_readme_zoo": "mahmoodlab/UNI README model table: 'UNI2-h | 01/2025 | ViT-h/14-reg8'",
    "hoptimus0_card": (
        "huggingface.co/bioptimus/H-optimus-0 card: 'a 1.1B parameter vision transformer'; 'expects images of size "
        "224x224 that were extracted at 0.5 microns per pixel'; timm.create_model('hf-hub:bioptimus/H-optimus-0', "
        "pretrained=True, init_values=1e-5, dynamic_img_size=False); Normalize(mean=(0.707223, 0.578729, "
        "0.703617), std=(0.211883, 0.230117, 0.177517)); config.json: architecture "
        "vit_giant_patch14_reg4_dinov2, num_features 1536, global_pool token, licence Apache 2.0; files: "
        "pytorch_model.bin 4.54 GB"
    ),
    "conch_v15_code": (
        "lingxitong/PFM_Segmentation models/build_conch_v1_5.py (a copy of TITAN's conch_v1_5.py; commit 5d3330a8) "
        "and its ConchConfig (the same class as TITAN's configuration_titan.py): VisionTransformer(patch_size 16, "
        "embed_dim=context_dim 1024, depth 24, num_heads 16, mlp_ratio 4, qkv_bias True, init_values 1e-6; "
        "img_size 448 '#CWM'; LayerNorm eps 1e-6, GELU, class token, no_embed_class False, global_pool token); "
        "Conch_V1_5_AttentionalPooler(d_model=embed_dim 768, context_dim 1024, n_head 8, n_queries 1): query "
        "[n_queries, d_model], ln_k LayerNorm(context_dim), ln_q LayerNorm(d_model), to_q Linear(d_model, inner, "
        "bias=False), to_kv Linear(context_dim, 2 inner, bias=False), to_out Linear(inner, d_model, bias=False), "
        "inner = d_model; forward: q = to_q(ln_q(query)), k, v = to_kv(ln_k(x)).chunk(2), softmax(q k^T * "
        "dim_head^-0.5) v, to_out; EncoderWithConch_V1_5_AttentionalPooler: trunk, attn_pool_contrast, ln_contrast "
        "= nn.LayerNorm(768); embedding = ln_contrast(attn_pool_contrast(trunk(x, return_all_tokens=True))[:, 0]); "
        "model.load_state_dict(torch.load(checkpoint), strict=True). TRIDENT: img_size 448, fp16, "
        "'pytorch_model_vision.bin' from huggingface.co/MahmoodLab/conchv1_5; PFM_Segmentation README: "
        "'CONCHv1.5 | 307M | 1024 | 16x16'; patch tokens trunk.forward_features(x)[:, 1:] (1024-d)"
    ),
    "lunit_zoo": (
        "lingxitong/PFM_Segmentation models/pfm_seg_models.py: lunit_vits8 = timm.create_model('vit_small_patch8_224', "
        "checkpoint_path=..., img_size=224) from 1aurent/vit_small_patch8_224.lunit_dino (model.safetensors), "
        "forward_features (class token first); slide2vec's registry (encoders/lunit.py): encode_dim 384, input 224, "
        "patch 8, 0.5 um/px, fp32, mean (0.70322989, 0.53606487, 0.66096631), std (0.21716536, 0.26081574, "
        "0.20723464), 'Lunit-S training stats, as documented by kaiko-ai/eva'"
    ),
    "hoptimus1_blog": "Bioptimus launch post: 'H-Optimus-1 is a 1.1 billion parameter vision transformer'",
    "phikon_config": (
        "huggingface.co/owkin/phikon config.json (transformers 4.34): ViTModel, hidden_size 768, "
        "num_hidden_layers 12, num_attention_heads 12, intermediate_size 3072, image_size 224, patch_size 16, "
        "qkv_bias true, hidden_act gelu, layer_norm_eps 1e-12 (a later commit 'Update layer_norm_eps to match "
        "timm'); files model.safetensors and pytorch_model.bin, 346 MB each"
    ),
    "phikon_v2_card": (
        "huggingface.co/owkin/phikon-v2 card: 'a Vision Transformer Large pre-trained with Dinov2 ... on PANCAN-XL, "
        "450M 20x magnification histology images'; 'ViT-L/16 via DINOv2'; the CLS token of last_hidden_state; "
        "files: config.json, model.safetensors 1.21 GB (config.json itself not readable here)"
    ),
    # Secondary, third-party, exact parameter counts
    "third_party_counts": (
        "Public code that sums p.numel() over the loaded models (not attributable to a named "
        "repository through the search index): a compute_flops.py whose recorded output is "
        "{'ProvGigaPath': (1134953984, ...), 'UNI': (303350784, ...)} with UNI loaded "
        "strict=True from pytorch_model.bin; and a KNOWN_PARAMS table {'uni_v1': 303350784, "
        "'virchow': 631229184, 'virchow2': 631239424, 'gigapath': 1134953984}. A third table "
        "lists UNI 303,350,784 / Prov-GigaPath 1,134,953,984 / Virchow(v1) 631,229,184."
    ),
}

# --------------------------------------------------------------------------------------------
# Published hyperparameters.
# Only keys that influence parameter names/shapes are used by expected_state_dict_shapes();
# num_heads / activation are recorded for separate (non-state-dict) assertions.
# --------------------------------------------------------------------------------------------
ARCHITECTURES: dict[str, dict] = {
    "uni": {
        # FACT (uni_readme, uni_get_encoder, trident): the owners' local-load recipe is
        #   timm.create_model("vit_large_patch16_224", img_size=224, patch_size=16,
        #                     init_values=1e-5, num_classes=0, dynamic_img_size=True)
        #   model.load_state_dict(torch.load(".../pytorch_model.bin"), strict=True)
        # FACT (uni_readme, the code comment in the hub snippet): "init_values need to be passed
        #   in to successfully load LayerScale parameters (e.g. - block.0.ls1.gamma)", i.e. the
        #   checkpoint contains LayerScale gammas.
        # FACT (uni_readme table / uni_paper): ViT-L/16. ViT-L is D=1024, 24 blocks, 16 heads,
        #   MLP ratio 4 (standard ViT-L definition, Dosovitskiy et al. 2020, table 1).
        # FACT (uni_readme): "feature_emb = model(image) # ... shape [1,1024]".
        "timm_name": "vit_large_patch16_224",
        "img_size": 224,
        "patch_size": 16,
        "in_chans": 3,
        "embed_dim": 1024,
        "depth": 24,
        "num_heads": 16,
        # FACT: plain (GELU) MLP, ratio 4 -> fc1 [4096, 1024], fc2 [1024, 4096].
        # No mlp_layer/act_layer override appears in any published UNI (v1) recipe.
        "mlp": "plain",
        "mlp_fc1_out": 4 * 1024,
        "mlp_fc2_in": 4 * 1024,
        "activation": "GELU",
        "layer_scale": True,  # FACT (init_values=1e-5 + 'block.0.ls1.gamma' comment)
        "class_token": True,
        "reg_tokens": 0,  # FACT: no reg_tokens argument in the published recipe
        "no_embed_class": False,  # FACT: not passed -> pos_embed covers the cls token too
        "qkv_bias": True,  # standard ViT-L (original ViT has qkv bias); see count check below
    },
    "virchow2": {
        # FACT (virchow2_card): ViT-H/14, patch 14, 32 layers, embedding dim 1280, 16 heads,
        #   SwiGLU, LayerScale true, 4 register tokens, image size 224 x 224.
        # FACT (virchow2_hf_config): vit_huge_patch14_224 with model_args img_size=224,
        #   init_values=1e-5, num_classes=0, reg_tokens=4, mlp_ratio=5.3375, global_pool="",
        #   dynamic_img_size=True -- and NO no_embed_class key.
        # FACT (virchow2_card): "need to specify MLP layer and activation function for proper
        #   init": mlp_layer=timm.layers.SwiGLUPacked, act_layer=torch.nn.SiLU.
        # FACT (trident): the local recipe timm.create_model("vit_huge_patch14_224", **those
        #   kwargs) followed by load_state_dict(pytorch_model.bin, strict=True).
        "timm_name": "vit_huge_patch14_224",
        "img_size": 224,
        "patch_size": 14,
        "in_chans": 3,
        "embed_dim": 1280,
        "depth": 32,
        "num_heads": 16,
        # DERIVED: SwiGLUPacked is one fused Linear producing value+gate, then a Linear from half
        #   that width:  fc1: D -> int(D * mlp_ratio) = int(1280 * 5.3375) = 6832 (exact),
        #                fc2: 6832 // 2 = 3416 -> D.
        # Corroboration (third-party test file that read Virchow *v1* model.safetensors, same
        #   ViT-H/14 + mlp_ratio 5.3375): "mlp.fc1 (6832, 1280) / mlp.fc2 (1280, 3416) -> packed
        #   gated FFN". Virchow2 uses the same mlp_ratio, so the same widths.
        "mlp": "swiglu_packed",
        "mlp_fc1_out": 6832,
        "mlp_fc2_in": 3416,
        "activation": "SiLU",
        "layer_scale": True,  # FACT (card 'LayerScale: true'; init_values=1e-5)
        "class_token": True,  # FACT (card: class_token = output[:, 0])
        "reg_tokens": 4,  # FACT (card; config reg_tokens=4)
        # INFERENCE (strong): pos_embed is [1, 1 + 4 + 256, 1280] = [1, 261, 1280], i.e. the
        #   checkpoint does NOT use no_embed_class. Reasons:
        #   (1) config.json model_args has no no_embed_class key, and the owners' recipe loads
        #       the raw pytorch_model.bin with strict=True into a model built from exactly those
        #       args (TRIDENT and many public copies). In timm's VisionTransformer the position
        #       table length is num_patches + num_prefix_tokens unless no_embed_class=True.
        #   (2) Exact third-party count 631,239,424 (third_party_counts) equals the derived total
        #       WITH a 261-row pos_embed; a 257-row table would give 631,233,024.
        #   (3) Virchow v1 (no registers) is published at 631,229,184 in two independent
        #       tables; v2 - v1 = 10,240 = 4*1280 (reg_token) + 4*1280 (four extra pos rows).
        #   Contrast: UNI2-h and Virchow2G-style recipes pass no_embed_class=True explicitly;
        #   Virchow2's do not.
        # FACT (card): forward output is 1 x 261 x 1280 at 224 px (1 cls + 4 reg + 256 patches);
        #   this is about the token sequence, not the pos table, so it is consistent with both
        #   options on its own -- hence the count-based argument above.
        "no_embed_class": False,
        "qkv_bias": True,
    },
    "gigapath": {
        # FACT (gigapath_hf_config): vit_giant_patch14_dinov2 with model_args img_size=224,
        #   in_chans=3, patch_size=16 (NOT 14 despite the name), embed_dim=1536, depth=40,
        #   num_heads=24, init_values=1e-05, mlp_ratio=5.33334, num_classes=0; global_pool token.
        # FACT (trident, and many public copies): local recipe
        #   timm.create_model("vit_giant_patch14_dinov2", pretrained=False, **model_args)
        #   load_state_dict(torch.load(pytorch_model.bin), strict=True).
        "timm_name": "vit_giant_patch14_dinov2",
        "img_size": 224,
        "patch_size": 16,
        "in_chans": 3,
        "embed_dim": 1536,
        "depth": 40,
        "num_heads": 24,
        # INFERENCE (pinned by the published exact count): the MLP is packed SwiGLU with
        #   fc1 [8192, 1536] and fc2 [1536, 4096]. config.json does not name the MLP layer;
        #   it comes from the architecture name (DINOv2 ViT-g uses SwiGLU with hidden
        #   (int(4*1536*2/3)+7)//8*8 = 4096, packed w12 -> 2*4096 = 8192).
        #   int(1536 * 5.33334) = int(8192.01) = 8192.
        #   The published count 1,134,953,984 (gigapath_notebook) is matched exactly by this
        #   layout; a plain MLP with hidden 8192 would give 1,386,612,224.
        "mlp": "swiglu_packed",
        "mlp_fc1_out": 8192,
        "mlp_fc2_in": 4096,
        "activation": "SiLU",
        "layer_scale": True,  # FACT (init_values=1e-05); count-consistent
        "class_token": True,  # FACT (global_pool 'token'; embedding = CLS, 1536-d)
        "reg_tokens": 0,  # FACT: no reg_tokens in model_args
        # DERIVED: pos_embed [1, 1 + (224/16)^2, 1536] = [1, 197, 1536]; count-consistent.
        # INFERENCE: no mask_token in the checkpoint (DINOv2's training-time mask token was
        #   dropped): timm's VisionTransformer has no such parameter, strict=True loading is
        #   published as working, and the exact count leaves no room for 1536 extra values.
        "no_embed_class": False,
        "qkv_bias": True,
    },
    # --- the encoder zoo (issue 21): sources in SOURCES (trident_zoo, pfmseg_zoo, ...) --------------------------
    "uni2_h": {
        # FACT (trident_zoo, pfmseg_zoo: the same kwargs, strict loads of pytorch_model.bin); the card's recipe as
        # many public copies reproduce it. ViT-h/14-reg8 (uni_readme_zoo).
        "timm_name": "vit_giant_patch14_224", "img_size": 224, "patch_size": 14, "in_chans": 3, "embed_dim": 1536,
        "depth": 24, "num_heads": 24,
        # DERIVED: int(1536 * 2.66667 * 2) = 8192 packed (gate, value); fc2 from half of it.
        "mlp": "swiglu_packed", "mlp_fc1_out": 8192, "mlp_fc2_in": 4096, "activation": "SiLU",
        "layer_scale": True, "class_token": True, "reg_tokens": 8,
        "no_embed_class": True,  # FACT (kwargs): the position table covers the 256 patches only
        "qkv_bias": True,
    },
    "virchow": {
        # FACT (trident_zoo): Virchow2's kwargs without reg_tokens; embedding cat(output[:,0], output[:,1:].mean(1)).
        "timm_name": "vit_huge_patch14_224", "img_size": 224, "patch_size": 14, "in_chans": 3, "embed_dim": 1280,
        "depth": 32, "num_heads": 16, "mlp": "swiglu_packed", "mlp_fc1_out": 6832, "mlp_fc2_in": 3416,
        "activation": "SiLU", "layer_scale": True, "class_token": True, "reg_tokens": 0, "no_embed_class": False,
        "qkv_bias": True,
    },
    "phikon": {
        # FACT (phikon_config): ViT-B/16, 768-d, 12 layers, 12 heads, intermediate 3072, qkv bias, GELU; no
        # LayerScale in transformers' ViT. The file's names are transformers' (TRANSFORMERS_CHECKPOINTS); these
        # are the same tensors in timm's names.
        "timm_name": "vit_base_patch16_224", "img_size": 224, "patch_size": 16, "in_chans": 3, "embed_dim": 768,
        "depth": 12, "num_heads": 12, "mlp": "plain", "mlp_fc1_out": 3072, "mlp_fc2_in": 3072,
        "activation": "GELU", "layer_scale": False, "class_token": True, "reg_tokens": 0, "no_embed_class": False,
        "qkv_bias": True,
    },
    "phikon_v2": {
        # FACT (phikon_v2_card): ViT-L/16 via DINOv2 (transformers' Dinov2Model: LayerScale, GELU MLP ratio 4, qkv
        # bias). INFERENCE: image_size 224 in its config.json (not readable here): a 224 px position table makes
        # 303,351,808 values = 1.2134 GB in fp32, the repository's '1.21 GB'; DINOv2's default 518 px would make
        # 1.2189 GB. The mask token (training only) is in the file but not in the model.
        "timm_name": "vit_large_patch16_224", "img_size": 224, "patch_size": 16, "in_chans": 3, "embed_dim": 1024,
        "depth": 24, "num_heads": 16, "mlp": "plain", "mlp_fc1_out": 4096, "mlp_fc2_in": 4096,
        "activation": "GELU", "layer_scale": True, "class_token": True, "reg_tokens": 0, "no_embed_class": False,
        "qkv_bias": True,
    },
    "hoptimus0": {
        # FACT (hoptimus0_card config.json: vit_giant_patch14_reg4_dinov2, global_pool token, 1536 features;
        # trident_zoo, pfmseg_zoo: the same build, strict loads). timm's definition of that name: ViT-g/14, 40
        # blocks, 24 heads, SwiGLU (DINOv2's 4096 hidden, packed 8192), 4 registers, no_embed_class.
        "timm_name": "vit_giant_patch14_reg4_dinov2", "img_size": 224, "patch_size": 14, "in_chans": 3,
        "embed_dim": 1536, "depth": 40, "num_heads": 24, "mlp": "swiglu_packed", "mlp_fc1_out": 8192,
        "mlp_fc2_in": 4096, "activation": "SiLU", "layer_scale": True, "class_token": True, "reg_tokens": 4,
        "no_embed_class": True, "qkv_bias": True,
    },
}
ARCHITECTURES["conch_v15"] = {
    # FACT (conch_v15_code): the trunk, a timm-style ViT-L/16 (timm's names) under "trunk."; the pooler beside it.
    # INFERENCE: the file's position table is for 448 px (785 rows): the owners' loader builds the trunk at its
    # default img_size and loads strictly, and PFM_Segmentation changed that default from 224 to 448 to load it.
    "timm_name": "vit_large_patch16_224", "img_size": 448, "patch_size": 16, "in_chans": 3, "embed_dim": 1024,
    "depth": 24, "num_heads": 16, "mlp": "plain", "mlp_fc1_out": 4096, "mlp_fc2_in": 4096, "activation": "GELU",
    "layer_scale": True, "class_token": True, "reg_tokens": 0, "no_embed_class": False, "qkv_bias": True,
    "state_dict_prefix": "trunk.",
    "attentional_pooler": {"d_model": 768, "context_dim": 1024, "n_queries": 1, "heads": 8},
}
ARCHITECTURES["lunit_vits8"] = {
    # FACT (lunit_zoo): timm's vit_small_patch8_224 (ViT-S: 384-d, 12 blocks, 6 heads, MLP 4x, GELU, no
    # LayerScale), loaded by timm from a timm-format file.
    "timm_name": "vit_small_patch8_224", "img_size": 224, "patch_size": 8, "in_chans": 3, "embed_dim": 384,
    "depth": 12, "num_heads": 6, "mlp": "plain", "mlp_fc1_out": 1536, "mlp_fc2_in": 1536, "activation": "GELU",
    "layer_scale": False, "class_token": True, "reg_tokens": 0, "no_embed_class": False, "qkv_bias": True,
}
# FACT (trident_zoo, pfmseg_zoo): H-optimus-1 is built and loaded exactly as H-optimus-0.
ARCHITECTURES["hoptimus1"] = ARCHITECTURES["hoptimus0"]


def _block_shapes(i: int, d: int, fc1_out: int, fc2_in: int, layer_scale: bool, qkv_bias: bool):
    p = f"blocks.{i}."
    out: dict[str, tuple[int, ...]] = {
        p + "norm1.weight": (d,),
        p + "norm1.bias": (d,),
        p + "attn.qkv.weight": (3 * d, d),
    }
    if qkv_bias:
        out[p + "attn.qkv.bias"] = (3 * d,)
    out.update(
        {
            p + "attn.proj.weight": (d, d),
            p + "attn.proj.bias": (d,),
        }
    )
    if layer_scale:
        out[p + "ls1.gamma"] = (d,)
    out.update(
        {
            p + "norm2.weight": (d,),
            p + "norm2.bias": (d,),
            p + "mlp.fc1.weight": (fc1_out, d),
            p + "mlp.fc1.bias": (fc1_out,),
            p + "mlp.fc2.weight": (d, fc2_in),
            p + "mlp.fc2.bias": (d,),
        }
    )
    if layer_scale:
        out[p + "ls2.gamma"] = (d,)
    return out


def expected_state_dict_shapes(name: str) -> dict[str, tuple[int, ...]]:
    """Names and shapes of every tensor in the published checkpoint of ``name``.

    Built purely from ``ARCHITECTURES[name]``. Key names follow timm's VisionTransformer
    (the published checkpoints are loaded into timm with strict=True, so they use timm's names):
    ``cls_token``, ``reg_token``, ``pos_embed``, ``patch_embed.proj.*``, ``blocks.{i}.*``,
    ``norm.*``. There is no ``head.*`` (num_classes=0 -> Identity) and no ``fc_norm.*``
    (global_pool 'token' / '' -> Identity), and no buffers.
    """
    if name not in ARCHITECTURES:
        raise KeyError(f"unknown model {name!r}; expected one of {MODEL_NAMES}")
    a = ARCHITECTURES[name]
    d = a["embed_dim"]
    grid = a["img_size"] // a["patch_size"]
    assert grid * a["patch_size"] == a["img_size"], "img_size must be a multiple of patch_size"
    num_patches = grid * grid
    num_prefix = (1 if a["class_token"] else 0) + a["reg_tokens"]
    pos_len = num_patches if a["no_embed_class"] else num_patches + num_prefix

    shapes: dict[str, tuple[int, ...]] = {}
    if a["class_token"]:
        shapes["cls_token"] = (1, 1, d)
    if a["reg_tokens"]:
        shapes["reg_token"] = (1, a["reg_tokens"], d)
    shapes["pos_embed"] = (1, pos_len, d)
    shapes["patch_embed.proj.weight"] = (d, a["in_chans"], a["patch_size"], a["patch_size"])
    shapes["patch_embed.proj.bias"] = (d,)
    for i in range(a["depth"]):
        shapes.update(
            _block_shapes(i, d, a["mlp_fc1_out"], a["mlp_fc2_in"], a["layer_scale"], a["qkv_bias"])
        )
    shapes["norm.weight"] = (d,)
    shapes["norm.bias"] = (d,)
    shapes = {a.get("state_dict_prefix", "") + k: v for k, v in shapes.items()}
    if "attentional_pooler" in a:  # CONCH v1.5 (conch_v15_code): attn_pool_contrast and ln_contrast
        pooler = a["attentional_pooler"]
        width, context = pooler["d_model"], pooler["context_dim"]
        shapes.update({
            "attn_pool_contrast.query": (pooler["n_queries"], width),
            "attn_pool_contrast.ln_k.weight": (context,), "attn_pool_contrast.ln_k.bias": (context,),
            "attn_pool_contrast.ln_q.weight": (width,), "attn_pool_contrast.ln_q.bias": (width,),
            "attn_pool_contrast.to_q.weight": (width, width),
            "attn_pool_contrast.to_kv.weight": (2 * width, context),
            "attn_pool_contrast.to_out.weight": (width, width),
            "ln_contrast.weight": (width,), "ln_contrast.bias": (width,),
        })
    return shapes


def derived_parameter_count(name: str) -> int:
    """Total number of values in :func:`expected_state_dict_shapes` (all are parameters)."""
    return sum(prod(s) for s in expected_state_dict_shapes(name).values())


# --------------------------------------------------------------------------------------------
# Exact parameter counts (num_classes=0 backbones, i.e. no head).
# --------------------------------------------------------------------------------------------
PUBLISHED_PARAMETER_COUNTS: dict[str, int] = {
    # FACT (third_party_counts, two independent public sources: a compute_flops.py run on UNI
    #   loaded strict=True from pytorch_model.bin, and a KNOWN_PARAMS table): 303,350,784.
    #   The owners only state it approximately (ViT-L/16, "0.3B" / ~303M). Equals
    #   derived_parameter_count("uni").
    "uni": 303_350_784,
    # FACT, but SECONDARY: 631,239,424 appears only in one third-party KNOWN_PARAMS table
    #   (third_party_counts). The owners publish "632 million" (virchow2_card 'Params (M): 632',
    #   virchow2_paper) -- an approximation (Virchow v1, which is 10,240 smaller, is also
    #   published as 632M). Equals derived_parameter_count("virchow2") with a 261-row pos_embed.
    "virchow2": 631_239_424,
    # FACT (gigapath_notebook, owners' repo): "Tile encoder param # 1134953984", printed by the
    #   owners' pipeline for the timm model built from the hub config. Also in third_party_counts.
    #   Equals derived_parameter_count("gigapath").
    "gigapath": 1_134_953_984,
    # The zoo. Owners publish rounded figures only (APPROXIMATE_PUBLISHED_COUNTS, checked in the tests); the
    # exact values below are DERIVED from the facts above, and tied to the files where their size is published.
    "uni2_h": 681_394_176,  # no owner count found (a DeepWiki page's '632M' contradicts the architecture)
    "virchow": 631_229_184,  # FACT (third_party_counts: KNOWN_PARAMS 'virchow': 631229184, and a second table)
    "phikon": 85_798_656,  # + ViTModel's pooler (590,592) = 86,389,248 x 4 B = the 346 MB files
    "phikon_v2": 303_350_784,  # + the mask token (1,024) = 303,351,808 x 4 B = the 1.21 GB file
    "hoptimus0": 1_134_774_272,  # x 4 B = 4.54 GB, the size of its pytorch_model.bin (hoptimus0_card)
    "hoptimus1": 1_134_774_272,
    "conch_v15": 306_711_296,  # trunk 303,952,896 + pooler 2,756,864 + ln_contrast 1,536
    "lunit_vits8": 21_670_272,  # ViT-S/8 at 224 px (DERIVED; no count published)
}

# Owner-published approximate figures, for reference only.
APPROXIMATE_PUBLISHED_COUNTS: dict[str, str] = {
    "uni": "ViT-L/16, ~0.3B (uni_paper)",
    "virchow2": "632M (virchow2_card, virchow2_paper)",
    "gigapath": "ViT-g/14 tile encoder, ~1.13B (Nature 2024 paper; exact count in gigapath_notebook)",
    "uni2_h": "ViT-h/14-reg8 (uni_readme_zoo); no count",
    "virchow": "632M (pfmseg_zoo README table)",
    "phikon": "85.8M (pfmseg_zoo README table)",
    "phikon_v2": "300M (pfmseg_zoo README table)",
    "hoptimus0": "1.1B (hoptimus0_card)",
    "hoptimus1": "1.1B (hoptimus1_blog)",
    "conch_v15": "307M (conch_v15_code: PFM_Segmentation README table)",
}
# The same, as (millions, the figure's decimals) for a check: the exact count rounds to the published figure.
# (Virchow's '632M' does not: 631.2M; its exact count is published, as is Virchow2's, also called 632M.)
ROUNDED_PUBLISHED_MILLIONS: dict[str, tuple[float, int]] = {
    "phikon": (85.8, 1), "phikon_v2": (300, -2), "hoptimus0": (1100, -2), "hoptimus1": (1100, -2),
    "conch_v15": (307, 0),
}


# --------------------------------------------------------------------------------------------
# Preprocessing prescribed by the model cards.
# --------------------------------------------------------------------------------------------
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

PREPROCESSING: dict[str, dict] = {
    "uni": {
        "input_size": (3, 224, 224),
        "mean": IMAGENET_MEAN,  # FACT (uni_readme: "normalization (ImageNet parameters)")
        "std": IMAGENET_STD,
        # FACT (uni_readme local-load snippet / HF card): transforms.Resize(224) ->
        #   ToTensor() -> Normalize(mean, std); no explicit crop, default (bilinear) resize of the
        #   SHORTER side to 224 (so 224x224 only for square tiles, e.g. 256x256 at 20x).
        # FACT (uni_get_encoder): the owners' get_encoder() defaults to center_crop=True, i.e.
        #   Resize(224) + CenterCrop(224); TRIDENT (trident) does the same.
        # FACT (uni_hf_config, as reproduced): pretrained_cfg tag 'uni_mass100k', crop_pct 1,
        #   interpolation 'bilinear', fixed_input_size false. (That config also says
        #   init_values 1.0 -- irrelevant to shapes; the README recipe uses 1e-5.)
        "resize": "Resize(224) [shorter side, bilinear]",
        "crop": "none in the card snippet; CenterCrop(224) in the owners' get_encoder default",
        "interpolation": "bilinear",
        "notes": "Pretraining tiles were 256x256 and 512x512 at 20x (0.5 um/px) (uni_paper).",
    },
    "virchow2": {
        "input_size": (3, 224, 224),
        "mean": IMAGENET_MEAN,  # FACT (virchow2_hf_config pretrained_cfg)
        "std": IMAGENET_STD,
        # FACT (virchow2_card): transforms = create_transform(**resolve_data_config(
        #   model.pretrained_cfg, model=model)) with pretrained_cfg input_size [3,224,224],
        #   interpolation bicubic, crop_pct 1.0, crop_mode center (virchow2_hf_config).
        # DERIVED: with crop_pct=1.0 timm's eval transform is Resize(224, bicubic, shorter side)
        #   -> CenterCrop(224) -> ToTensor -> Normalize. TRIDENT writes it as
        #   Resize(224, BICUBIC) -> ToTensor -> Normalize (identical for square tiles).
        "resize": "Resize(224) [shorter side, bicubic]",
        "crop": "CenterCrop(224) (crop_pct=1.0, so a no-op for square inputs)",
        "interpolation": "bicubic",
        "notes": "Card: 1 x 3 x 224 x 224 input -> 1 x 261 x 1280 tokens.",
    },
    "gigapath": {
        "input_size": (3, 224, 224),
        "mean": IMAGENET_MEAN,  # FACT (gigapath_readme Normalize)
        "std": IMAGENET_STD,
        # FACT (gigapath_readme, gigapath_pipeline load_tile_encoder_transforms):
        #   Resize(256, interpolation=BICUBIC) -> CenterCrop(224) -> ToTensor -> Normalize.
        "resize": "Resize(256) [shorter side, bicubic]",
        "crop": "CenterCrop(224)",
        "interpolation": "bicubic",
        "notes": "Tiles are 256x256 at 0.5 um/px (20x) (Nature 2024 paper, Fig. 1).",
    },
    # The zoo: ImageNet statistics for all but H-optimus (trident_zoo, pfmseg_zoo data/transforms.py).
    **{name: {"input_size": (3, 224, 224), "mean": IMAGENET_MEAN, "std": IMAGENET_STD}
       for name in ("uni2_h", "virchow", "phikon", "phikon_v2")},
    **{name: {"input_size": (3, 224, 224), "mean": (0.707223, 0.578729, 0.703617),
              "std": (0.211883, 0.230117, 0.177517), "notes": "224 px at 0.5 um/px (hoptimus0_card)"}
       for name in ("hoptimus0", "hoptimus1")},
    "lunit_vits8": {"input_size": (3, 224, 224), "mean": (0.70322989, 0.53606487, 0.66096631),
                    "std": (0.21716536, 0.26081574, 0.20723464), "notes": "224 px at 0.5 um/px (lunit_zoo)"},
    "conch_v15": {"input_size": (3, 448, 448), "mean": IMAGENET_MEAN, "std": IMAGENET_STD,
                  "notes": "512 px at 20x resized to 448 (TITAN's TRIDENT recipe); ImageNet (pfmseg_zoo)"},
}

# --------------------------------------------------------------------------------------------
# Embedding the model cards recommend.
# --------------------------------------------------------------------------------------------
RECOMMENDED_EMBEDDING: dict[str, dict] = {
    "uni": {
        # FACT (uni_readme): feature_emb = model(image) -> [1, 1024]; timm global_pool 'token'
        #   = final-norm CLS token.
        "dim": 1024,
        "recipe": "model(x) with num_classes=0 (CLS token after final norm)",
    },
    "virchow2": {
        # FACT (virchow2_card): output = model(x) (global_pool='' -> all tokens, 1 x 261 x 1280);
        #   class_token = output[:, 0]; patch_tokens = output[:, 5:] (tokens 1-4 are registers);
        #   embedding = torch.cat([class_token, patch_tokens.mean(1)], dim=-1) -> 1 x 2560.
        "dim": 2560,
        "num_prefix_tokens": 5,
        "pooling": "cls+mean_patch",
        "recipe": "cat([out[:, 0], out[:, 5:].mean(1)], -1)",
    },
    "gigapath": {
        # FACT (gigapath_readme: output = tile_encoder(x).squeeze();
        #   gigapath_notebook: tile_embeds shape [810, 1536]).
        "dim": 1536,
        "recipe": "model(x) with num_classes=0, global_pool 'token' (CLS token after final norm)",
    },
    # The zoo (trident_zoo, pfmseg_zoo): the class token after the final norm, except Virchow (class token and
    # the patch tokens' mean, as Virchow2).
    "uni2_h": {"dim": 1536, "num_prefix_tokens": 9, "recipe": "model(x), global_pool token"},
    "virchow": {"dim": 2560, "pooling": "cls+mean_patch", "recipe": "cat([out[:, 0], out[:, 1:].mean(1)], -1)"},
    "phikon": {"dim": 768, "recipe": "last_hidden_state[:, 0, :]"},
    "phikon_v2": {"dim": 1024, "recipe": "last_hidden_state[:, 0, :]"},
    "hoptimus0": {"dim": 1536, "num_prefix_tokens": 5, "recipe": "model(x), global_pool token"},
    "hoptimus1": {"dim": 1536, "num_prefix_tokens": 5, "recipe": "model(x), global_pool token"},
    "lunit_vits8": {"dim": 384, "recipe": "forward_features(x)[:, 0] (timm global_pool token)"},
    "conch_v15": {"dim": 768, "pooling": "attentional",
                  "recipe": "ln_contrast(attn_pool_contrast(trunk(x, return_all_tokens=True))[:, 0])"},
}


def _self_check() -> None:
    for n in MODEL_NAMES:
        got = derived_parameter_count(n)
        want = PUBLISHED_PARAMETER_COUNTS[n]
        if got != want:
            raise AssertionError(f"{n}: derived {got} != published {want}")


_self_check()
