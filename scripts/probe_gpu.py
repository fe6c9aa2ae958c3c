# Side experiment (run by hand on a GPU machine, never by CI): how many generated images does
# the demo ViT (dim 64, depth 4, heads 4, mlp 128, patch 16, 224 px) need on the vitcx shapes
# benchmark? PyTorch + timm, bf16 autocast on CUDA; prints validation accuracy against images
# seen, for each run in runs=TAG:TOKEN_LABEL_WEIGHT:LR:BATCH,... (seconds=S per run).
# Data: `vitcx synth` directories, train=GLOB (default /tmp/tr*) and val=DIR (default /tmp/val):
#   for i in $(seq 0 15); do vitcx synth --count 4000 --seed $((1000+i)) --out /tmp/tr$i -q & done
#   vitcx synth --count 2000 --seed 778 --out /tmp/val -q; wait
#   python3 scripts/probe_gpu.py seconds=150 every=500 runs=tl0:0:1e-3:128,tl1:1:1e-3:128
# decay=1 decays the learning rate by a cosine over each run's seconds (after the 200-step
# warm-up); save=DIR writes the last run's model as a timm checkpoint vitcx loads
# (DIR/model.safetensors + DIR/config.json, the demo model's config with this run recorded under
# `vitcx_training`); then measure it as the demo model is measured:
#   cargo run --release --example train_demo -- --evaluate DIR
import sys, json, math, time, glob, os, numpy as np, torch, timm
from multiprocessing import Pool
from PIL import Image
A=dict(a.split('=') for a in sys.argv[1:])
dev='cuda' if torch.cuda.is_available() else 'cpu'
def load_one(args):
    d,e=args
    x=np.asarray(Image.open(f"{d}/{e['image']}").convert('RGB'))
    m=np.asarray(Image.open(f"{d}/{e['mask']}"))>0
    return x, e['class_id'], m.reshape(14,16,14,16).mean((1,3))
def load(dirs):
    jobs=[(d,json.loads(l)) for d in dirs for l in open(f'{d}/manifest.jsonl')]
    with Pool(min(16,os.cpu_count())) as p: R=p.map(load_one, jobs, chunksize=64)
    X=torch.from_numpy(np.stack([r[0] for r in R])).permute(0,3,1,2).contiguous()
    y=torch.tensor([r[1] for r in R]); M=torch.from_numpy(np.stack([r[2] for r in R]))
    T=torch.where(M>=0.5, y[:,None,None], torch.full_like(y[:,None,None],6)).reshape(len(R),196)
    return X.to(dev), y.to(dev), T.to(dev)
t0=time.time()
Xt,yt,Tt=load(sorted(glob.glob(A.get('train','/tmp/tr*'))))
Xv,yv,_=load([A.get('val','/tmp/val')])
print(f"loaded {len(yt)} train {len(yv)} val in {time.time()-t0:.0f}s on {dev}", flush=True)
def run(tl, lr, bs, seconds, tag):
    torch.manual_seed(0)
    m=timm.models.vision_transformer.VisionTransformer(img_size=224,patch_size=16,embed_dim=64,depth=4,num_heads=4,mlp_ratio=2,num_classes=6).to(dev)
    th=torch.nn.Linear(64,7).to(dev)
    opt=torch.optim.AdamW(list(m.parameters())+list(th.parameters()),lr=lr,weight_decay=0.05)
    norm=lambda x:(x.float()/255-0.5)/0.5
    t1=time.time(); s=0; seen=0
    while time.time()-t1<seconds:
        frac=(time.time()-t1)/seconds if A.get('decay')=='1' and s>=200 else 0
        for g in opt.param_groups: g['lr']=lr*min(1,(s+1)/200)*0.5*(1+math.cos(math.pi*min(frac,1)))
        idx=torch.randint(0,len(yt),(bs,),device=dev); x=Xt[idx]; tt=Tt[idx].reshape(bs,14,14)
        if s%2: x=x.flip(3); tt=tt.flip(2)
        if (s//2)%2: x=x.flip(2); tt=tt.flip(1)
        with torch.autocast(dev,dtype=torch.bfloat16,enabled=dev=='cuda'):
            f=m.forward_features(norm(x)); loss=torch.nn.functional.cross_entropy(m.forward_head(f),yt[idx])
            if tl>0: loss=loss+tl*torch.nn.functional.cross_entropy(th(f[:,1:]).reshape(-1,7),tt.reshape(-1))
        opt.zero_grad(); loss.backward(); opt.step(); s+=1; seen+=bs
        if s%int(A.get('every',500))==0:
            m.eval()
            with torch.no_grad(), torch.autocast(dev,dtype=torch.bfloat16,enabled=dev=='cuda'):
                acc=sum((m(norm(Xv[i:i+500])).argmax(1)==yv[i:i+500]).sum().item() for i in range(0,len(yv),500))/len(yv)
            m.train()
            print(f"{tag} step {s} images {seen} loss {loss.item():.3f} val {acc:.4f} {time.time()-t1:.0f}s", flush=True)
    return m, dict(trainer='scripts/probe_gpu.py (PyTorch '+torch.__version__+', timm '+timm.__version__+', '+('bf16 autocast on CUDA' if dev=='cuda' else 'f32 on CPU')+')',
                   steps=s, images_seen=seen, lr=lr, batch=bs, token_label_weight=tl, seconds=seconds,
                   cosine_decay=A.get('decay')=='1', train_pool=len(yt), args=sys.argv[1:])
def save(m, record, out):
    from safetensors.torch import save_file
    os.makedirs(out, exist_ok=True)
    save_file({k: v.detach().float().cpu().contiguous() for k, v in m.state_dict().items()}, f"{out}/model.safetensors")
    here=os.path.dirname(os.path.abspath(__file__))
    cfg=json.load(open(f"{here}/../models/demo/config.json"))
    cfg['vitcx_training']=record
    json.dump(cfg, open(f"{out}/config.json", 'w'), indent=1)
    print(f"saved {out}", flush=True)
for spec in A.get('runs','tl0:0:1e-3:128,tl1:1:1e-3:128').split(','):
    tag,tl,lr,bs=spec.split(':'); last=run(float(tl),float(lr),int(bs),float(A.get('seconds',150)),tag)
if 'save' in A: save(*last, A['save'])
