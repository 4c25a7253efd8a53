"""A tiny stand-in with the module layout of the MolmoE remote code (no download possible here):
model.vision_backbone.{image_vit, image_pooling_2d, image_projector}, model.transformer.{wte,
blocks[i].mlp.top_k, ln_f, ff_out}, and a forward that asserts one cache entry per configured
layer, like the original."""

import torch
from torch import nn


class Cfg:
    def __init__(self, n_layers=3, d=16, vocab=64, experts=4, top_k=2):
        self.n_layers, self.d_model, self.vocab_size = n_layers, d, vocab
        self.moe_num_experts, self.moe_top_k = experts, top_k
        self.image_patch_id = vocab - 1


class MoeMlp(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.top_k, self.num_experts = cfg.moe_top_k, cfg.moe_num_experts
        self.router = nn.Linear(cfg.d_model, self.num_experts, bias=False)
        self.experts = nn.ModuleList(nn.Linear(cfg.d_model, cfg.d_model) for _ in range(self.num_experts))

    def forward(self, x):
        w, idx = torch.topk(self.router(x).softmax(-1), self.top_k, dim=-1)
        out = torch.zeros_like(x)
        for j in range(self.top_k):
            for e in range(self.num_experts):
                sel = idx[..., j] == e
                if sel.any():
                    out[sel] += w[..., j][sel, None] * self.experts[e](x[sel])
        return out


class Block(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.att = nn.Linear(cfg.d_model, cfg.d_model)
        self.mlp = MoeMlp(cfg)

    def forward(self, x, cache):
        cache.append(x.shape[1])
        return x + self.mlp(x + self.att(x))


class VisionBackbone(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.image_vit = nn.Sequential(nn.Linear(48, cfg.d_model), nn.GELU(), nn.Linear(cfg.d_model, cfg.d_model))
        self.image_pooling_2d = nn.Linear(cfg.d_model, cfg.d_model)
        self.image_projector = nn.Linear(cfg.d_model, cfg.d_model)

    def forward(self, images):
        feats = self.image_vit(images)
        return self.image_projector(self.image_pooling_2d(feats))


class Molmo(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.config = cfg
        self.vision_backbone = VisionBackbone(cfg)
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(cfg.vocab_size, cfg.d_model),
            blocks=nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers)),
            ln_f=nn.LayerNorm(cfg.d_model),
            ff_out=nn.Linear(cfg.d_model, cfg.vocab_size, bias=False),
        ))

    def forward(self, input_ids, images=None):
        x = self.transformer.wte(input_ids)
        if images is not None:
            img = self.vision_backbone(images)
            mask = input_ids == self.config.image_patch_id
            x = x.clone()
            x[mask] = img.reshape(-1, x.shape[-1])[: int(mask.sum())]
        cache = []
        for block in self.transformer.blocks:
            x = block(x, cache)
        assert len(cache) == self.config.n_layers, "one cache entry per configured layer"
        return self.transformer.ff_out(self.transformer.ln_f(x))


class MolmoForCausalLM(nn.Module):
    def __init__(self, cfg=None):
        super().__init__()
        self.config = cfg or Cfg()
        self.model = Molmo(self.config)

    @torch.no_grad()
    def generate(self, input_ids, images=None, max_new_tokens=4):
        ids = input_ids
        logits = self.model(ids, images)  # prefill (no KV cache in this stand-in)
        for i in range(max_new_tokens):
            nxt = logits[:, -1:].argmax(-1)
            ids = torch.cat([ids, nxt], dim=1)
            if i + 1 < max_new_tokens:
                logits = self.model(ids[:, -1:])
        return ids

    def generate_from_batch(self, batch, max_new_tokens=4):
        # like Molmo's remote code, which calls super().generate(...): the class's method, never
        # an instance attribute that wraps it
        return MolmoForCausalLM.generate(self, batch["input_ids"], images=batch.get("images"),
                                         max_new_tokens=max_new_tokens)
