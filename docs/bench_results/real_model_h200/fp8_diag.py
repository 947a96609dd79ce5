import torch
from lsa_runtime.cold_pool import ColdPool, quantize_fp8, dequantize_fp8
gen = torch.Generator().manual_seed(3)
rows = torch.randn(300, 128, generator=gen).to(torch.bfloat16)
qc, sc = quantize_fp8(rows); qg, sg = quantize_fp8(rows.cuda())
print("q bits differ", (qc != qg.cpu()).sum().item(), "scales differ", (sc != sg.cpu()).sum().item())
bc = (rows.float().view(300, 2, 64) / sc.unsqueeze(2)); bg = (rows.float().cuda().view(300, 2, 64) / sg.unsqueeze(2))
print("quotients differ", (bc != bg.cpu()).sum().item())
f8c = bc.to(torch.float8_e4m3fn).view(torch.uint8); f8g = bg.to(torch.float8_e4m3fn).view(torch.uint8).cpu()
bad = (f8c != f8g).nonzero()
print("fp8 conversions differ", bad.shape[0], [(bc[tuple(i)].item(), f8c[tuple(i)].item(), f8g[tuple(i)].item()) for i in bad[:5]])
dc = dequantize_fp8(qc, sc, torch.bfloat16); dg = dequantize_fp8(qc.cuda(), sc.cuda(), torch.bfloat16).cpu()
print("dequant differs", (dc != dg).sum().item())
for pin in (False, True):
    pools = [ColdPool([2], {"compressor": 128, "indexer": 128}, torch.bfloat16, storage="fp8", pin=p) for p in (False, pin)]
    for pool, device in zip(pools, ("cpu", "cuda")):
        for name in pool.NAMES:
            pool.append(2, name, rows[:100].to(device)); pool.append(2, name, rows[100:].to(device))
    for name in pools[0].NAMES:
        a = pools[1].stream_prefix(2, name, 200, "cuda").cpu(); b = pools[0].stream_prefix(2, name, 200, "cpu")
        h = pools[1].host_rows(2, name)[:200]; hb = pools[0].host_rows(2, name)[:200]
        print("pin", pin, name, "stream rows differ", (a != b).any(1).nonzero().flatten().tolist()[:10],
              "host rows differ", (h != hb).any(1).nonzero().flatten().tolist()[:10])
