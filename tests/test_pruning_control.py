"""The benchmarks' pruning control (benchmarks/pruning_control.py): layer
dropping and Torch-Pruning width pruning to an exact target config."""
import os
import sys

import pytest
import torch
import transformers as T

pytest.importorskip("torch_pruning")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))

import pruning_control as pc  # noqa: E402
from models import bert, vit  # noqa: E402

# Per family: (q, k, v, attention output, FFN in, FFN out) inside a block.
NAMES = {"vit": ("attention.q_proj", "attention.k_proj", "attention.v_proj", "attention.o_proj",
                 "mlp.fc1", "mlp.fc2"),
         "bert": ("attention.self.query", "attention.self.key", "attention.self.value",
                  "attention.output.dense", "intermediate.dense", "output.dense")}


def parent(family, layers=4):
    if family == "vit":
        return vit(hidden=64, heads=4, inter=128, layers=layers)
    return bert(hidden=64, heads=4, inter=128, layers=layers, cls=T.BertForSequenceClassification)


def batches(family, n=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    if family == "vit":
        return [{"pixel_values": torch.randn(4, 1, 8, 8, generator=g),
                 "labels": torch.randint(0, 10, (4,), generator=g)} for _ in range(n)]
    return [{"input_ids": torch.randint(1, 60, (4, 8), generator=g),
             "attention_mask": torch.ones(4, 8, dtype=torch.long),
             "labels": torch.randint(0, 3, (4,), generator=g)} for _ in range(n)]


def target(model, hidden, heads, ffn):
    cfg = type(model.config).from_dict(model.config.to_dict())
    cfg.hidden_size, cfg.num_attention_heads, cfg.intermediate_size = hidden, heads, ffn
    return cfg


@torch.no_grad()
def logits(model, batch):
    return model(**{k: v for k, v in batch.items() if k != "labels"}).logits


def blocks(model):
    return model.vit.layers if model.config.model_type == "vit" else model.bert.encoder.layer


# ----------------------------------------------------------------------------- depth

def test_every_other():
    assert pc.every_other(12, 6) == [0, 2, 4, 6, 8, 10]
    assert pc.every_other(4, 2) == [0, 2]
    assert pc.every_other(6, 4) == [0, 1, 3, 4]
    assert pc.every_other(3, 3) == [0, 1, 2]
    with pytest.raises(ValueError):
        pc.every_other(2, 3)


@torch.no_grad()
def _silence(block):
    """A pre-norm ViT block writing nothing to the residual stream: the identity."""
    for m in (block.attention.o_proj, block.mlp.fc2):
        m.weight.zero_()
        m.bias.zero_()


@pytest.mark.parametrize("identity", [[1, 3], [0, 1], [2, 3]])
def test_lowest_influence_drops_identity_blocks(identity):
    model = parent("vit")
    for i in identity:
        _silence(model.vit.layers[i])
    data = batches("vit")
    kept = pc.lowest_influence(model, data, 2)
    assert kept == [i for i in range(4) if i not in identity]
    assert pc.every_other(4, 2) == [0, 2]
    shallow = pc.drop_blocks(model, kept)
    assert shallow.config.num_hidden_layers == 2 and len(shallow.vit.layers) == 2
    torch.testing.assert_close(logits(shallow, data[0]), logits(model, data[0]), rtol=1e-5, atol=1e-5)


def test_drop_blocks_is_an_independent_renumbered_copy():
    model = parent("bert")
    before = model.bert.encoder.layer[3].attention.self.query.weight.clone()
    shallow = pc.drop_blocks(model, [1, 3])
    assert type(shallow) is type(model) and shallow.config.num_hidden_layers == 2
    torch.testing.assert_close(shallow.bert.encoder.layer[1].attention.self.query.weight, before, rtol=0, atol=0)
    with torch.no_grad():
        shallow.bert.encoder.layer[1].attention.self.query.weight.zero_()
    torch.testing.assert_close(model.bert.encoder.layer[3].attention.self.query.weight, before, rtol=0, atol=0)


# ----------------------------------------------------------------------------- width

@pytest.mark.parametrize("family", ["vit", "bert"])
@pytest.mark.parametrize("importance", ["l2", "taylor"])
def test_drop_and_prune_to_exact_config(family, importance, tmp_path):
    model = parent(family)
    shallow = pc.drop_blocks(model, pc.every_other(4, 2))
    data = batches(family)
    small = pc.torch_prune(shallow, target(shallow, 16, 2, 32), importance, data)
    assert type(small) is type(model)
    cfg = small.config
    assert (cfg.hidden_size, cfg.num_attention_heads, cfg.intermediate_size, cfg.num_hidden_layers) == (16, 2, 32, 2)
    q, _, _, o, up, down = (blocks(small)[1].get_submodule(n) for n in NAMES[family])
    assert q.weight.shape == (16, 16) and o.weight.shape == (16, 16)
    assert up.weight.shape == (32, 16) and down.weight.shape == (16, 32)
    out = logits(small, data[0])
    assert out.shape == logits(model, data[0]).shape and torch.isfinite(out).all()
    small.save_pretrained(tmp_path)
    again = type(model).from_pretrained(tmp_path).eval()
    torch.testing.assert_close(logits(again, data[0]), out, rtol=0, atol=0)
    # the parent is untouched
    assert blocks(shallow)[0].get_submodule(NAMES[family][0]).weight.shape == (64, 64)


def test_prune_to_other_head_width():
    """4 heads of 16 -> 2 heads of 16 (heads only) and hidden 64 -> 32."""
    model = pc.drop_blocks(parent("vit"), [0, 3])
    small = pc.torch_prune(model, target(model, 32, 2, 64), "l2")
    assert small.vit.layers[0].attention.q_proj.weight.shape == (32, 32)
    assert torch.isfinite(logits(small, batches("vit")[0])).all()


@torch.no_grad()
def _kill(model, heads=(), units=()):
    """Zero `heads` (their q/k/v outputs and attention-output inputs) and FFN
    `units` in every block: neither changes any output."""
    family = model.config.model_type
    hd = model.config.hidden_size // model.config.num_attention_heads
    rows = torch.tensor([h * hd + d for h in heads for d in range(hd)], dtype=torch.long)
    units = torch.as_tensor(units, dtype=torch.long)
    for block in blocks(model):
        q, k, v, o, up, down = (block.get_submodule(n) for n in NAMES[family])
        for m in (q, k, v):
            m.weight[rows] = 0
            m.bias[rows] = 0
        o.weight[:, rows] = 0
        up.weight[units] = 0
        up.bias[units] = 0
        down.weight[:, units] = 0


@pytest.mark.parametrize("family", ["vit", "bert"])
@pytest.mark.parametrize("importance", ["l2", "taylor"])
def test_removes_exactly_the_dead_units(family, importance):
    """Both importances must keep the 32 live FFN units of 128 (a dead unit
    has zero weights and zero gradients): then the pruned model computes
    exactly what the parent does."""
    model = pc.drop_blocks(parent(family), [0, 2])
    dead = torch.randperm(128, generator=torch.Generator().manual_seed(1))[:96]
    _kill(model, units=dead)
    data = batches(family)
    small = pc.torch_prune(model, target(model, 64, 4, 32), importance, data)
    assert small.config.intermediate_size == 32
    batch = data[0]
    torch.testing.assert_close(logits(small, batch), logits(model, batch), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("family", ["vit", "bert"])
@pytest.mark.parametrize("width", [(32, 2), (16, 2)])  # heads only; heads and head dims
def test_l2_removes_the_dead_heads(family, width):
    """Heads 0 and 2 are dead in every block: the two kept heads must be 1 and 3
    (no q/k/v output left that is zero for every input)."""
    model = pc.drop_blocks(parent(family), [1, 2])
    _kill(model, heads=[0, 2])
    small = pc.torch_prune(model, target(model, width[0], width[1], 64), "l2")
    for block in blocks(small):
        for name in NAMES[family][:3]:
            m = block.get_submodule(name)
            assert m.weight.shape[0] == width[0]
            assert (m.weight.abs().sum(1) + m.bias.abs() > 0).all(), name


@torch.no_grad()
def test_l2_keeps_the_strongest_residual_units():
    model = pc.drop_blocks(parent("vit"), [1, 3])
    strong = [5, 22, 40, 61]
    conv = model.vit.embeddings.patch_embeddings.projection
    for name, p in model.named_parameters():
        if name.endswith(("cls_token", "position_embeddings")):
            p[..., strong] *= 30
        elif name == "vit.embeddings.patch_embeddings.projection.weight":
            p[strong] *= 30
        elif name.endswith(("q_proj.weight", "k_proj.weight", "v_proj.weight", "fc1.weight")):
            p[:, strong] *= 30
    small = pc.torch_prune(model, target(model, 16, 2, 32), "l2")
    kept = small.vit.embeddings.patch_embeddings.projection.weight
    for k in strong:
        assert any(torch.equal(kept[j], conv.weight[k]) for j in range(kept.shape[0])), k


def test_rejects_what_it_cannot_do():
    model = parent("vit", layers=2)
    with pytest.raises(ValueError, match="drop blocks first"):
        pc.torch_prune(model, target(pc.drop_blocks(model, [0]), 16, 2, 32))
    with pytest.raises(ValueError, match="taylor"):
        pc.torch_prune(model, target(model, 16, 2, 32), "taylor")
    with pytest.raises(ValueError, match="structured"):
        pc.torch_prune(model, target(model, 64, 2, 32))  # head width 32 > 16


# ----------------------------------------------------------------------------- LLaMA (rotary, GQA)

def llama(layers=4, hidden=64, heads=4, kv=2, inter=128, seed=0):
    torch.manual_seed(seed)
    cfg = T.LlamaConfig(vocab_size=60, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                        num_key_value_heads=kv, head_dim=16, intermediate_size=inter,
                        max_position_embeddings=32, tie_word_embeddings=False)
    return T.LlamaForCausalLM(cfg).eval()


def llama_batches(n=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(1, 60, (4, 8), generator=g)
        out.append({"input_ids": ids, "attention_mask": torch.ones(4, 8, dtype=torch.long), "labels": ids})
    return out


def llama_target(model, hidden, heads, kv, inter):
    cfg = type(model.config).from_dict(model.config.to_dict())
    cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads = hidden, heads, kv
    cfg.intermediate_size = inter
    return cfg


@torch.no_grad()
def _kill_llama(model, groups=(), units=()):
    """Zero whole key/value groups (their k/v rows, their query heads' rows and
    output-projection columns) and MLP units in every block: no output changes."""
    cfg = model.config
    hd, rep = cfg.head_dim, cfg.num_attention_heads // cfg.num_key_value_heads
    kv_rows = [g * hd + d for g in groups for d in range(hd)]
    q_rows = [g * rep * hd + d for g in groups for d in range(rep * hd)]
    for block in model.model.layers:
        a, m = block.self_attn, block.mlp
        a.q_proj.weight[q_rows] = 0
        a.k_proj.weight[kv_rows] = 0
        a.v_proj.weight[kv_rows] = 0
        a.o_proj.weight[:, q_rows] = 0
        m.gate_proj.weight[list(units)] = 0
        m.up_proj.weight[list(units)] = 0
        m.down_proj.weight[:, list(units)] = 0


@pytest.mark.parametrize("importance", ["l2", "taylor"])
def test_llama_drop_and_prune_to_exact_gqa_config(importance, tmp_path):
    model = llama()
    shallow = pc.drop_blocks(model, pc.every_other(4, 2))
    data = llama_batches()
    small = pc.magnitude_prune(shallow, llama_target(shallow, 32, 2, 1, 64), importance, data)
    cfg = small.config
    assert (cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.intermediate_size,
            cfg.num_hidden_layers) == (32, 2, 1, 64, 2)
    a = small.model.layers[1].self_attn
    assert a.q_proj.weight.shape == (32, 32) and a.k_proj.weight.shape == (16, 32) and a.o_proj.weight.shape == (32, 32)
    out = logits(small, data[0])
    assert out.shape == logits(model, data[0]).shape and torch.isfinite(out).all()
    small.save_pretrained(tmp_path)
    torch.testing.assert_close(logits(T.LlamaForCausalLM.from_pretrained(tmp_path).eval(), data[0]), out,
                               rtol=0, atol=0)


@pytest.mark.parametrize("importance", ["l2", "taylor"])
@pytest.mark.parametrize("dead", [0, 1])
def test_llama_removes_exactly_the_dead_group_and_units(importance, dead):
    """One key/value group of two and 96 of 128 MLP units are dead: pruning to
    1 key/value group (2 query heads) and 32 units keeps the function."""
    model = pc.drop_blocks(llama(), [1, 2])
    units = torch.randperm(128, generator=torch.Generator().manual_seed(1))[:96].tolist()
    _kill_llama(model, groups=[dead], units=units)
    data = llama_batches()
    small = pc.magnitude_prune(model, llama_target(model, 64, 2, 1, 32), importance, data)
    assert small.config.num_key_value_heads == 1 and small.config.intermediate_size == 32
    torch.testing.assert_close(logits(small, data[0]), logits(model, data[0]), rtol=1e-4, atol=1e-5)


@torch.no_grad()
def test_llama_l2_keeps_the_strongest_residual_units():
    model = pc.drop_blocks(llama(), [0, 3])
    strong = [3, 17, 40, 63]
    for name, p in model.named_parameters():
        if name.endswith(("embed_tokens.weight", "q_proj.weight", "up_proj.weight", "lm_head.weight")):
            p[:, strong] *= 30
    small = pc.magnitude_prune(model, llama_target(model, 16, 2, 1, 32), "l2")
    emb = small.model.embed_tokens.weight
    for k in strong:
        assert any(torch.equal(emb[:, j], model.model.embed_tokens.weight[:, k]) for j in range(16)), k


def test_llama_refusals():
    model = pc.drop_blocks(llama(), [0, 3])
    with pytest.raises(ValueError, match="whole key/value groups"):
        pc.magnitude_prune(model, llama_target(model, 64, 2, 2, 128))  # query heads inside groups
    with pytest.raises(NotImplementedError, match="magnitude_prune"):
        pc.torch_prune(model, llama_target(model, 32, 2, 1, 64))


@pytest.mark.parametrize("importance", ["l2", "taylor"])
def test_bert_masked_lm_head_follows_the_residual_units(importance, tmp_path):
    """BertForMaskedLM ties its decoder to the input embeddings: the pruned
    model keeps the tie, and the head's transform keeps the residual units
    the embeddings kept."""
    model = pc.drop_blocks(bert(hidden=64, heads=4, inter=128, layers=4), [0, 2])
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # not the init's zeros and ones, so that the kept units are seen
        for p in (model.cls.predictions.transform.dense.bias, model.cls.predictions.transform.LayerNorm.weight):
            p.copy_(torch.randn(p.shape, generator=g))
    ids = torch.randint(1, 60, (4, 8), generator=g)
    data = [{"input_ids": ids, "attention_mask": torch.ones(4, 8, dtype=torch.long), "labels": ids}]
    small = pc.torch_prune(model, target(model, 32, 2, 64), importance, data)
    emb, dense = small.bert.embeddings.word_embeddings.weight, small.cls.predictions.transform.dense
    assert small.cls.predictions.decoder.weight.data_ptr() == emb.data_ptr()
    old = model.bert.embeddings.word_embeddings.weight
    kept = [next(k for k in range(64) if torch.equal(old[:, k], emb[:, j])) for j in range(32)]
    torch.testing.assert_close(dense.bias, model.cls.predictions.transform.dense.bias[kept], rtol=0, atol=0)
    torch.testing.assert_close(small.cls.predictions.transform.LayerNorm.weight,
                               model.cls.predictions.transform.LayerNorm.weight[kept], rtol=0, atol=0)
    assert torch.isfinite(logits(small, data[0])).all()
    small.save_pretrained(tmp_path)
    torch.testing.assert_close(logits(T.BertForMaskedLM.from_pretrained(tmp_path).eval(), data[0]),
                               logits(small, data[0]), rtol=0, atol=0)


def test_a_pooler_less_encoder_is_pruned_without_a_pooler():
    """An embedding encoder (BertModel without its pooler) comes back as one."""
    model = bert(hidden=64, heads=4, inter=128, cls=T.BertModel)
    model.pooler = None
    small = pc.torch_prune(model, target(model, 32, 2, 64), "l2")
    assert small.pooler is None and small.config.hidden_size == 32
    x = torch.randint(5, 60, (2, 8))
    assert small(input_ids=x).last_hidden_state.shape == (2, 8, 32)
