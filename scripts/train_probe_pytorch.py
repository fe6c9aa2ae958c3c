"""Side experiment (run by hand, never by CI): how fast does a model learn the synth benchmark?

Trains timm's VisionTransformer (patch 16, 224 px, the demo model's sizes by default) or a small
CNN (cnn=1) in PyTorch on a fixed set written by `vitcx synth`, printing training loss and
validation accuracy every 50 steps. Arguments are key=value:
  train=DIR (default /work/runs/synth_train) n=12000 steps=600 bs=32 lr=1e-3 warm=100 wd=0.05
  dim=64 depth=4 heads=4 pool=token|avg tl=0 (token-labelling weight) binary=0 minbox=0 cur=0
  threads=2 cnn=0 sincos=0 (2-D sine-cosine start of the position embedding) mim=0 (mimetic init) mimab=0.7,0.7,0.4,0.4 val=DIR
Validation uses the first 500 images of val=DIR (default /work/runs/synth_val). Example:
  vitcx synth --count 12000 --seed 777 --out /work/runs/synth_train -q
  vitcx synth --count 1000 --seed 778 --out /work/runs/synth_val -q
  python scripts/train_probe_pytorch.py steps=1000 tl=1
"""
import sys, json, time, numpy as np, torch, timm
from PIL import Image
args=dict(a.split('=') for a in sys.argv[1:])
torch.set_num_threads(int(args.get("threads",2))); torch.manual_seed(0)
def load(d, n):
    L=[json.loads(l) for l in open(f'{d}/manifest.jsonl')][:n]
    mb=int(args.get('minbox',0)); L=[e for e in L if e['bbox'][2]-e['bbox'][0]>=mb]
    X=np.stack([np.asarray(Image.open(f"{d}/{e['image']}")) for e in L]).astype(np.uint8)
    y=np.array([e['class_id'] for e in L])
    M=np.stack([np.asarray(Image.open(f"{d}/{e['mask']}"))>0 for e in L]).reshape(len(L),14,16,14,16).mean((2,4))
    T=np.where(M>=0.5, (y[:,None,None] if args.get('binary','0')=='0' else 0), 6).reshape(len(L),196)
    global TOK; TOK=torch.from_numpy(T).long()
    global BOX; BOX=torch.tensor([e['bbox'][2]-e['bbox'][0] for e in L])
    return torch.from_numpy(X).permute(0,3,1,2).contiguous(), torch.from_numpy(y)
lr=float(args.get('lr',1e-3)); bs=int(args.get('bs',32)); steps=int(args.get('steps',600)); pool=args.get('pool','token')
dim=int(args.get('dim',64)); depth=int(args.get('depth',4)); heads=int(args.get('heads',4)); wd=float(args.get('wd',0.05)); warm=int(args.get('warm',100))
Xt,yt=load(args.get('train','/work/runs/synth_train'), int(args.get('n',12000))); TT=TOK; BOXT=BOX; order=torch.argsort(BOXT,descending=True)
cur_frac=float(args.get('cur',0)); Xv,yv=load(args.get('val','/work/runs/synth_val'),500)
m=timm.models.vision_transformer.VisionTransformer(img_size=224,patch_size=16,embed_dim=dim,depth=depth,num_heads=heads,mlp_ratio=2,num_classes=6,global_pool=pool, class_token=True)
if args.get('cnn'):
    class C(torch.nn.Module):
        def __init__(s):
            super().__init__()
            L=[];c=3
            for o in [32,64,128,128,128]: L+=[torch.nn.Conv2d(c,o,3,2,1),torch.nn.BatchNorm2d(o),torch.nn.ReLU()]; c=o
            s.f=torch.nn.Sequential(*L); s.h=torch.nn.Linear(c,6)
        def forward_features(s,x): return s.f(x)
        def forward_head(s,f): return s.h(f.mean((2,3)))
        def forward(s,x): return s.forward_head(s.forward_features(x))
    m=C()
if args.get('sincos','0')=='1' and not args.get('cnn'):
    # 2-D sine-cosine position embedding as the starting point (MoCo v3 / MAE style), still trained.
    g14=torch.arange(14,dtype=torch.float32); q=dim//4; om=1/10000**(torch.arange(q)/q)
    yy,xx=torch.meshgrid(g14,g14,indexing='ij')
    pe=torch.cat([torch.sin(xx.reshape(-1,1)*om),torch.cos(xx.reshape(-1,1)*om),torch.sin(yy.reshape(-1,1)*om),torch.cos(yy.reshape(-1,1)*om)],1)
    with torch.no_grad(): m.pos_embed[0,1:]=pe; m.pos_embed[0,0]=0
if args.get('mim','0')=='1' and not args.get('cnn'):
    # Mimetic initialisation (Trockman & Kolter, ICML 2023): per head W_q W_k^T ~ a1 Z + b1 I and
    # W_v W_proj ~ a2 Z - b2 I (Z ~ N(0, 1/d)), so that attention starts out attending to similar
    # tokens and nearby positions, as trained ViTs do.
    a1,b1,a2,b2=[float(v) for v in args.get('mimab','0.7,0.7,0.4,0.4').split(',')]
    hd=dim//heads; I=torch.eye(dim)
    with torch.no_grad():
        for blk in m.blocks:
            W=blk.attn.qkv.weight
            for h in range(heads):
                U,S,Vh=torch.linalg.svd(a1*torch.randn(dim,dim)/dim**0.5+b1*I)
                W[h*hd:(h+1)*hd]=(U[:,:hd]*S[:hd].sqrt()).T
                W[dim+h*hd:dim+(h+1)*hd]=(Vh[:hd].T*S[:hd].sqrt()).T
            U,S,Vh=torch.linalg.svd(a2*torch.randn(dim,dim)/dim**0.5-b2*I)
            W[2*dim:]=(U*S.sqrt()).T
            blk.attn.proj.weight.copy_((S.sqrt()[:,None]*Vh).T)
tokhead=torch.nn.Linear(dim,7); tl=float(args.get('tl',0))
opt=torch.optim.AdamW(list(m.parameters())+list(tokhead.parameters()),lr=lr,weight_decay=wd)
def norm(x): return (x.float()/255-0.5)/0.5
g=torch.Generator().manual_seed(0); t0=time.time()
for s in range(steps):
    cur = lr*min(1,(s+1)/warm)*(0.5*(1+np.cos(np.pi*max(0,s-warm)/max(1,steps-warm))))
    for pg in opt.param_groups: pg['lr']=cur
    if cur_frac>0:
        f=min(1.0, 0.25+0.75*s/(cur_frac*steps)); k=max(bs,int(f*len(Xt)))
        idx=order[torch.randint(0,k,(bs,),generator=g)]
    else:
        idx=torch.randint(0,len(Xt),(bs,),generator=g)
    x=Xt[idx]
    fh=bool(torch.rand(1,generator=g)<0.5); fv=bool(torch.rand(1,generator=g)<0.5)
    if fh: x=x.flip(3)
    if fv: x=x.flip(2)
    x=norm(x)
    tt=TT[idx].reshape(bs,14,14)
    # flips applied to x above must be applied to tt: recompute flags
    loss=0
    feats=m.forward_features(x)
    loss=torch.nn.functional.cross_entropy(m.forward_head(feats),yt[idx])
    if tl>0:
        if fh: tt=tt.flip(2)
        if fv: tt=tt.flip(1)
        loss=loss+tl*torch.nn.functional.cross_entropy(tokhead(feats[:,1:]).reshape(-1,7),tt.reshape(-1))
    opt.zero_grad(); loss.backward(); opt.step()
    if (s+1)%50==0:
        with torch.no_grad(): acc=(m(norm(Xv)).argmax(1)==yv[:500]).float().mean().item()
        print(f"step {s+1} loss {loss.item():.3f} cls {torch.nn.functional.cross_entropy(m.forward_head(feats),yt[idx]).item():.3f} val {acc:.3f} {time.time()-t0:.0f}s", flush=True)
