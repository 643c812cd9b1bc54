"""Why does the compiled Adam differ from torch.optim on a few entries? Errors against float64."""
import sys, torch, triton, triton.language as tl
sys.path.insert(0, ".")
from optiscope.optimizers.adam import Adam, AdamW
DEV = "cuda" if torch.cuda.is_available() else "cpu"

shapes = ((1,), (7,), (3, 5), (4097,), (257, 1031), (1 << 20,))
def params():
    torch.manual_seed(0)
    return [torch.randn(s) for s in shapes]
def grads(seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g) for s in shapes]

@triton.jit
def ref_kernel(p_ptr, g_ptr, m_ptr, v_ptr, n, lr, b1, b2, eps, wd, step_size, bc2s,
               PRECISE: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    p = tl.load(p_ptr + offs, mask=mask); g = tl.load(g_ptr + offs, mask=mask)
    m = tl.load(m_ptr + offs, mask=mask); v = tl.load(v_ptr + offs, mask=mask)
    g = g + wd * p
    m = b1 * m + (1.0 - b1) * g
    v = b2 * v + (1.0 - b2) * (g * g)
    if PRECISE:
        denom = tl.div_rn(tl.sqrt_rn(v), bc2s) + eps
        p = p - step_size * tl.div_rn(m, denom)
    else:
        denom = tl.sqrt(v) / bc2s + eps
        p = p - step_size * (m / denom)
    tl.store(p_ptr + offs, p, mask=mask); tl.store(m_ptr + offs, m, mask=mask); tl.store(v_ptr + offs, v, mask=mask)

def report(name, got, ref, what):
    worst = []
    for i, (x, r) in enumerate(zip(got, ref)):
        x = x.detach().double().cpu(); r = r.detach().double()
        err = (x - r).abs()
        scale = 1e-2  # the step's size: lr
        bad = int((err > 1e-7 + 1e-5 * r.abs()).sum())
        k = int(err.flatten().argmax())
        worst.append(f"p{i}: max {err.max().item():.3g} ({err.max().item()/scale:.2g} of lr) bad {bad} @ {k}")
    print(f"{name} {what}: " + "; ".join(worst))

def run(label, make, steps=3, only=None):
    a = params()
    idx = only if only is not None else range(len(shapes))
    ps = [torch.nn.Parameter(a[i].clone().to(DEV)) for i in idx]
    ref = [torch.nn.Parameter(a[i].clone().double()) for i in idx]
    opt = make(ps); ropt = torch.optim.Adam(ref, lr=1e-2, weight_decay=0.1, foreach=False)
    for s in range(steps):
        gs = grads(s)
        for x, r, i in zip(ps, ref, idx):
            x.grad = gs[i].to(DEV); r.grad = gs[i].double()
        if hasattr(opt, "request_stats") and "stats" in label:
            opt.request_stats()
        opt.step(); ropt.step()
        report(label, ps, ref, f"step {s}")
        if 3 in idx:
            j = list(idx).index(3)
            print(f"   {label} p3[1169] step {s}: {ps[j][1169].item()!r} f64 {ref[j][1169].item()!r}")

kw = dict(lr=1e-2, weight_decay=0.1)
run("torch-cuda", lambda ps: torch.optim.Adam(ps, foreach=False, **kw))
run("ours-triton", lambda ps: Adam(ps, backend="triton", **kw))
run("ours-triton-stats", lambda ps: Adam(ps, backend="triton", **kw))
run("ours-triton-only-p3", lambda ps: Adam(ps, backend="triton", **kw), only=[3])
run("ours-torch", lambda ps: Adam(ps, backend="torch", **kw))
for precise in (False, True):
    a = params(); n = 4097
    p = a[3].clone().to(DEV); m = torch.zeros_like(p); v = torch.zeros_like(p)
    r = a[3].clone().double(); rm = torch.zeros_like(r); rv = torch.zeros_like(r)
    for s in range(3):
        g = grads(s)[3]; t = s + 1
        bc1 = 1 - 0.9 ** t; bc2 = 1 - 0.999 ** t
        ref_kernel[(triton.cdiv(n, 1024),)](p, g.to(DEV), m, v, n, 1e-2, 0.9, 0.999, 1e-8, 0.1,
                                           1e-2 / bc1, bc2 ** 0.5, PRECISE=precise, BLOCK=1024)
        gg = g.double() + 0.1 * r
        rm = 0.9 * rm + 0.1 * gg; rv = 0.999 * rv + 0.001 * gg * gg
        r = r - (1e-2 / bc1) * rm / (rv.sqrt() / bc2 ** 0.5 + 1e-8)
        report(f"plain-kernel precise={precise}", [p], [r], f"step {s}")
        if s == 1:
            print("   p3[1169]:", p[1169].item(), "f64", r[1169].item())
