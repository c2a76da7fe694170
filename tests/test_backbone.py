"""SparseUNet against a dense re-implementation with torch.nn.functional conv3d / conv_transpose3d."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from scene3d.sparse.spconv_compat import sparse_tensor
from scene3d.tokenizer.backbone import BackboneConfig, SparseUNet

S, B = 8, 2


def _dense(feat, idx, c):
    out = feat.new_zeros(B, S, S, S, c)
    i = idx.long()
    return out.index_put((i[:, 0], i[:, 1], i[:, 2], i[:, 3]), feat).permute(0, 4, 1, 2, 3)


def _bn(x, bn):
    if isinstance(bn, torch.nn.Identity):
        return x
    shape = (1, -1, 1, 1, 1)
    return (x - bn.running_mean.view(shape)) / torch.sqrt(bn.running_var.view(shape) + bn.eps) * bn.weight.view(
        shape
    ) + bn.bias.view(shape)


def _w(conv):  # spconv KRSC [out, kx, ky, kz, in] -> conv3d [out, in, kx, ky, kz]
    return conv.weight.permute(0, 4, 1, 2, 3)


def dense_unet(net: SparseUNet, x: torch.Tensor, mask0: torch.Tensor) -> torch.Tensor:
    """Naive dense forward of ``net`` (eval mode): every op on the full grid, then zeroed off the active set."""
    masks = [mask0]
    for _ in range(net.cfg.depth):
        masks.append(F.max_pool3d(masks[-1], 2, stride=2))

    def subm(h, conv, m):
        return F.conv3d(h, _w(conv), padding=1) * m

    def block(h, blk, m):
        r = torch.relu(_bn(subm(h, blk.conv1, m), blk.norm1)) * m
        return torch.relu(_bn(subm(r, blk.conv2, m), blk.norm2) + h) * m

    h = torch.relu(_bn(subm(x, net.stem, masks[0]), net.stem_norm)) * masks[0]
    skips = []
    for i in range(net.cfg.depth + 1):
        for blk in net.enc[i]:
            h = block(h, blk, masks[i])
        if i < net.cfg.depth:
            skips.append(h)
            h = F.conv3d(h, _w(net.down[i]), stride=2) * masks[i + 1]
            h = torch.relu(_bn(h, net.down_norm[i])) * masks[i + 1]
    for i in reversed(range(net.cfg.depth)):
        h = F.conv_transpose3d(h, net.up[i].weight.permute(4, 0, 1, 2, 3), stride=2) * masks[i]
        h = torch.relu(_bn(h, net.up_norm[i])) * masks[i]
        cat = torch.cat([skips[i], h], 1)
        h = torch.einsum("bcxyz,oc->boxyz", cat, net.fuse[i].weight)
        h = torch.relu(_bn(h, net.fuse_norm[i])) * masks[i]
        for blk in net.dec[i]:
            h = block(h, blk, masks[i])
    return h


@pytest.mark.parametrize("norm", ["batch", "none"])
def test_unet_matches_dense_reference(norm):
    torch.manual_seed(0)
    cfg = BackboneConfig(in_channels=4, channels=(8, 12, 16), blocks=1, norm=norm)
    net = SparseUNet(cfg)
    for m in net.modules():  # non-trivial eval-mode norms
        if isinstance(m, torch.nn.BatchNorm1d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
            torch.nn.init.uniform_(m.weight, 0.5, 1.5)
            torch.nn.init.uniform_(m.bias, -0.1, 0.1)
    net.eval()
    idx = (torch.rand(B, S, S, S) < 0.3).nonzero().int()
    feat = torch.randn(len(idx), 4)

    fs = feat.clone().requires_grad_(True)
    out = net(sparse_tensor(fs, idx, [S] * 3, B))
    assert torch.equal(out.indices.long(), idx.long())
    g = torch.randn(out.features.shape)
    (out.features * g).sum().backward()
    sparse_grads = {n: p.grad.clone() for n, p in net.named_parameters()}
    net.zero_grad()

    fd = feat.clone().requires_grad_(True)
    mask0 = _dense(torch.ones(len(idx), 1), idx, 1)
    ref_dense = dense_unet(net, _dense(fd, idx, 4), mask0)
    i = idx.long()
    ref = ref_dense.permute(0, 2, 3, 4, 1)[i[:, 0], i[:, 1], i[:, 2], i[:, 3]]
    (ref * g).sum().backward()

    torch.testing.assert_close(out.features, ref, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(fs.grad, fd.grad, atol=1e-5, rtol=1e-4)
    for name, p in net.named_parameters():
        if p.grad is None:  # eval-mode BN affine still gets grads; nothing should be unused
            raise AssertionError(f"{name} received no gradient in the dense reference")
        torch.testing.assert_close(sparse_grads[name], p.grad, atol=1e-4, rtol=1e-4, msg=name)


def test_config_validation_and_channel_check():
    with pytest.raises(ValueError):
        BackboneConfig(channels=(8, 0))
    with pytest.raises(ValueError):
        BackboneConfig(norm="layer")
    net = SparseUNet(BackboneConfig(in_channels=3, channels=(4, 8)))
    idx = torch.tensor([[0, 1, 1, 1]])
    with pytest.raises(ValueError, match="input channels"):
        net(sparse_tensor(torch.zeros(1, 5), idx, [4, 4, 4], 1))


def test_train_mode_backward_runs_and_depth_zero():
    torch.manual_seed(1)
    idx = (torch.rand(1, S, S, S) < 0.2).nonzero().int()
    for channels in [(8,), (8, 8, 8)]:
        net = SparseUNet(BackboneConfig(in_channels=3, channels=channels)).train()
        out = net(sparse_tensor(torch.randn(len(idx), 3, requires_grad=True), idx, [S] * 3, 1))
        assert out.features.shape == (len(idx), 8)
        out.features.pow(2).mean().backward()
        assert all(p.grad is not None for p in net.parameters())
