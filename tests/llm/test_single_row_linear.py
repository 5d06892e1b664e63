"""Single-row bf16 projections go through torch.mv (faster on CPU) and give exactly F.linear's numbers, so a
row decoded alone and the same row decoded in a batch still agree bit for bit."""
import pytest
import torch
import torch.nn.functional as F

from modules.llm.cpu_threading import linear
from modules.llm.config import LlamaConfig
from modules.llm.model import Llama


@pytest.mark.parametrize("shape", [(5632, 2048), (2048, 5632), (256, 2048), (1000, 64)])
def test_one_bf16_row_equals_f_linear_bit_for_bit(shape):
    torch.manual_seed(0)
    weight = (torch.randn(*shape) * 0.02).bfloat16()
    x = torch.randn(1, 1, shape[1]).bfloat16()
    y = linear(x, weight)
    assert y.shape == (1, 1, shape[0]) and y.dtype == torch.bfloat16
    assert torch.equal(y, F.linear(x, weight))
    batch = torch.cat([x, torch.randn(1, 3, shape[1]).bfloat16()], dim=1)
    assert torch.equal(y[0, 0], F.linear(batch, weight)[0, 0])      # the same row inside a batch


def test_other_inputs_keep_f_linear():
    torch.manual_seed(0)
    weight, bias = torch.randn(8, 4, requires_grad=True), torch.randn(8)
    x = torch.randn(2, 4)
    assert torch.equal(linear(x, weight, bias), F.linear(x, weight, bias))          # fp32, two rows, a bias
    y = linear(torch.randn(1, 4, requires_grad=True).bfloat16(), weight.bfloat16())
    y.sum().backward()                                                             # gradients flow through mv
    assert weight.grad is not None


def test_a_bf16_model_decodes_the_same_logits_alone_and_in_a_batch():
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = Llama(config).to(torch.bfloat16).eval()
    ids = torch.randint(0, 96, (2, 5))
    with torch.inference_mode():
        alone = model(ids[:1, -1:], positions=torch.tensor([[4]]), cache=None)
        batch = model(ids[:, -1:], positions=torch.tensor([[4], [4]]), cache=None)
    assert torch.equal(alone[0], batch[0])


def test_module_hooks_see_every_projection_of_a_single_row():
    """The importance-matrix collector (and any extension) hooks the model's linears: a one-row bf16 decode
    through torch.mv still calls them as modules."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=160, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = Llama(config).to(torch.bfloat16).eval()
    seen = []
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            module.register_forward_pre_hook(lambda m, args, name=name: seen.append(name))
    with torch.inference_mode():
        model(torch.tensor([[5]]))
    assert sorted(seen) == sorted(n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear))
    assert len(seen) == 8
