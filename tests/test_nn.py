"""The masked decoder (nn): batched computation, checkpointing, the mask's reading."""

import pytest
import torch

from sparsevae.nn import MaskedDecoder


@pytest.mark.parametrize("n_layers,n_output", [(1, 1), (2, 1), (3, 2)])
def test_batched_decoder_matches_gene_loop(n_layers, n_output):
    torch.manual_seed(0)
    dec = MaskedDecoder(23, 4, n_hidden=16, n_layers=n_layers, n_output=n_output)
    with torch.no_grad():
        dec.W.copy_(torch.randn_like(dec.W))
        dec.head_bias.normal_()
    z = torch.randn(9, 4)
    expected = dec.forward_loop(z)
    assert expected.shape == (9, 23, n_output)
    for max_chunk in (2**20, 16 * 9 * 5, 1):  # one chunk, several chunks, one gene per chunk
        dec.max_chunk_elements = max_chunk
        torch.testing.assert_close(dec(z), expected, atol=1e-5, rtol=1e-5)


def test_decoder_checkpointing_gives_same_gradients():
    torch.manual_seed(0)
    dec = MaskedDecoder(30, 3, n_hidden=8, n_layers=2, max_chunk_elements=8 * 5 * 7)
    z = torch.randn(5, 3, requires_grad=True)
    dec(z).square().sum().backward()
    g_plain = [p.grad.clone() for p in dec.parameters()] + [z.grad.clone()]
    dec.zero_grad()
    z.grad = None
    dec.max_saved_elements = 1  # force recomputation
    dec(z).square().sum().backward()
    g_ckpt = [p.grad for p in dec.parameters()] + [z.grad]
    for a, b in zip(g_plain, g_ckpt, strict=True):
        torch.testing.assert_close(a, b)


def test_decoder_gene_only_sees_its_mask_row():
    torch.manual_seed(0)
    dec = MaskedDecoder(5, 3, n_hidden=8)
    with torch.no_grad():
        dec.W.zero_()
        dec.W[0, 1] = 1.0
    z = torch.randn(6, 3)
    z2 = z.clone()
    z2[:, [0, 2]] = torch.randn(6, 2)  # change the factors gene 0 does not see
    torch.testing.assert_close(dec(z)[:, 0], dec(z2)[:, 0])


def test_closed_gate_cuts_the_entry_but_lets_its_gradient_through():
    torch.manual_seed(0)
    dec = MaskedDecoder(6, 3, n_hidden=8, n_specific=2, n_studies=2)
    with torch.no_grad():
        dec.gate[1, 0] = 0.0
        dec.gate_specific[1, 2, 1] = 0.0
    z = torch.randn(5, 5)
    study = torch.tensor([0, 1, 1, 0, 1])
    expected = dec.forward_loop(z, study=study)
    torch.testing.assert_close(dec(z, study=study), expected, atol=1e-5, rtol=1e-5)
    # Gene 1 no longer depends on factor 0; gene 2 of study 1 not on specific factor 1.
    tangent = torch.zeros_like(z)
    tangent[:, 0] = 1.0
    _, d = torch.func.jvp(lambda x: dec(x, study=study), (z,), (tangent,))
    assert torch.all(d[:, 1] == 0) and torch.any(d[:, 0] != 0)
    tangent = torch.zeros_like(z)
    tangent[:, 4] = 1.0
    _, d = torch.func.jvp(lambda x: dec(x, study=study), (z,), (tangent,))
    assert torch.all(d[study == 1, 2] == 0) and torch.any(d[study == 0, 2] != 0)
    # The closed entries still get the likelihood's gradient (straight through the gate).
    dec(z, study=study).square().sum().backward()
    assert dec.W.grad[1, 0] != 0 and dec.W_specific.grad[1, 2, 1] != 0
    W, V = dec.gated_masks()
    assert W[1, 0] == 0 and V[1, 2, 1] == 0 and W[0, 0] == dec.W[0, 0]


@pytest.mark.parametrize("n_specific", [0, 2])
@pytest.mark.parametrize("exp_output", [False, True])
def test_effect_sums_equal_forward_mode_derivatives(n_specific, exp_output):
    # One backward pass for all factors must give the per-factor forward-mode derivatives,
    # through closed gates, two outputs per gene (zinb) and several gene chunks.
    torch.manual_seed(0)
    dec = MaskedDecoder(
        23, 4, n_hidden=8, n_layers=3, n_output=2, n_specific=n_specific, n_studies=3,
        max_chunk_elements=8 * 8 * 5,
    )  # fmt: skip
    with torch.no_grad():
        dec.W.mul_(torch.randn(23, 4))
        dec.gate[torch.rand(23, 4) < 0.3] = 0.0
        dec.first.bias.normal_()
    z = torch.randn(9, 4 + n_specific)
    study = torch.tensor([0, 1, 2, 0, 1, 2, 0, 0, 1]) if n_specific else None
    shared, specific = dec.effect_sums(z, study, exp_output=exp_output)
    with torch.no_grad():
        cols = []
        for k in range(4 + n_specific):
            tangent = torch.zeros_like(z)
            tangent[:, k] = 1.0
            out, d = torch.func.jvp(lambda t: dec(t, study=study)[..., 0], (z,), (tangent,))
            cols.append(d * torch.exp(out) if exp_output else d)  # (cells, genes)
    expected = torch.stack([c.sum(0) for c in cols[:4]], dim=1).double()
    torch.testing.assert_close(shared, expected, rtol=1e-4, atol=1e-5)
    if n_specific:
        for s in range(3):
            m = study == s
            exp_s = torch.stack([c[m].sum(0) for c in cols[4:]], dim=1).double()
            torch.testing.assert_close(specific[s], exp_s, rtol=1e-4, atol=1e-5)
    else:
        assert specific is None
    assert (shared[dec.gate == 0] == 0).all()
