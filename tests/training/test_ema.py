"""EMA of the trainable parameters: the update rule, state round trip, and temporary application."""
import torch

from longlive.training.ema import EMA


def test_ema_update_state_and_applied():
    model = torch.nn.Linear(3, 2)
    ema = EMA(model, decay=0.9)
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ema.update(model)
    for n, p in model.named_parameters():
        torch.testing.assert_close(ema.shadow[n], 0.9 * start[n] + 0.1 * p.detach())
    other = EMA(torch.nn.Linear(3, 2), decay=0.9)
    other.load_state_dict(ema.state_dict())
    for n in ema.shadow:
        assert torch.equal(other.shadow[n], ema.shadow[n])
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with ema.applied(model):
        for n, p in model.named_parameters():
            assert torch.equal(p, ema.shadow[n])
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n])
