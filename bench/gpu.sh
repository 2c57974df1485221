#!/usr/bin/env bash
# One GPU, under 10 minutes: each script's `--bench` training step at its paper architecture (random
# weights from the released configs by bench/random_models.py, no download), bf16 autocast, SDPA,
# torch.compile off and on, as one table of samples/s, MFU and peak memory; then every CUDA-only
# path once (bench/cuda_paths.py).  docs/bench.md: what each row runs, the table once measured.
#
#   bash bench/gpu.sh                     # GPU: paper sizes; the table in runs/bench/table.md
#   DEVICE=cpu TINY=1 bash bench/gpu.sh   # the same commands at toy size on CPU (tests/test_bench.py)
#
# Environment:
#   DEVICE cuda | cpu; TINY 1: toy-size models and batches; STEPS timed steps (10) after each
#   script's warm-up steps; OUT (runs/bench); TOY the toy data (default $OUT/toy, built data-only
#   on first use, ~10 s); COMPILE 1: also the --compile true rows, only: those alone (default 1
#   on cuda, else 0: inductor on 2 CPU cores takes minutes); TOTAL_S the whole script's limit
#   (570): a row gets what is left minus 40 s kept for the CUDA paths and the table, at most
#   ROW_TIMEOUT_S (240), and is skipped when that is under 30 s; PATHS_S the CUDA-path checks'
#   limit (default what is left of TOTAL_S less 5 s for the table, at least 30 s: a hung NCCL
#   init still leaves the table written); ROWS comma-separated row names
#   (default all); BATCH one batch for every row (e.g. DEVICE=cpu BATCH=2 STEPS=1: the paper
#   architectures on CPU); MODELS a subset of random_models.py's folders; PYTHON (python).
#   A rerun reuses the toy data, the model folders and inductor's cache: e.g. COMPILE=only
#   ROWS=dlip_pretrain for a row that the limit skipped.
# A row's batch is the paper recipe's per-GPU micro batch, one micro batch per step (no gradient
# accumulation): one GPU's share of the paper's run.  Commands: $OUT/commands.txt; logs: $OUT/logs.
set -u
cd "$(dirname "$0")/.."
DEVICE=${DEVICE:-cuda}; TINY=${TINY:-0}; STEPS=${STEPS:-10}; OUT=${OUT:-runs/bench}
COMPILE=${COMPILE:-$([ "${DEVICE%%:*}" = cuda ] && echo 1 || echo 0)}
TOTAL_S=${TOTAL_S:-570}; ROW_TIMEOUT_S=${ROW_TIMEOUT_S:-240}; PY=${PYTHON:-python}
TOY=${TOY:-$OUT/toy}; M=$OUT/models; LOGS=$OUT/logs; RESULTS=$OUT/results.tsv
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
START=$SECONDS
mkdir -p "$LOGS" && : > "$RESULTS" && : > "$OUT/commands.txt" && : > "$OUT/summary.txt"

# ---- sizes: per-GPU micro batches of the paper recipes; TINY also shrinks the flag-sized student
if [ "$TINY" = 1 ]; then
    B_BLIP2=4; B_DLIP=4; B_NEG=4; B_PERC=4; B_ICW=4; WORKERS=0; MODEL_FLAGS=--tiny
    X_BLIP2="--image_size 64"  # the tiny ViTs' input (the paper recipe: 224)
    X_DLIP="--image_size 64 --vit_width 64 --vit_layers 2 --vit_heads 4 --vit_mlp 128
            --text_width 64 --text_layers 2 --text_heads 4 --text_ffn 128"
else
    # blip2 stages 1/2: 128 (the preset's micro batch of its global 1024; LAVIS's own
    # pretrain_stage1/2.yaml have batch_size_train 100 / 64); dlip: 288 (V2's 1152 on 4 GPUs);
    # negclip: 256 rows; perceiver: the seed's 32; Image-Chat warm-up: 16 (the release's
    # 2016 = 126 x 16)
    B_BLIP2=128; B_DLIP=288; B_NEG=256; B_PERC=32; B_ICW=16; WORKERS=8; MODEL_FLAGS=""
    X_BLIP2=""; X_DLIP=""
fi
[ -n "${MODELS:-}" ] && MODEL_FLAGS="$MODEL_FLAGS --only $MODELS"
if [ -n "${BATCH:-}" ]; then
    B_BLIP2=$BATCH; B_DLIP=$BATCH; B_NEG=$BATCH; B_PERC=$BATCH; B_ICW=$BATCH
fi

elapsed() { echo $((SECONDS - START)); }
note() { printf '%s\n' "$*" | tee -a "$OUT/summary.txt"; }
wants() { case ",${ROWS:-$1}," in *",$1,"*) return 0 ;; esac; return 1; }  # row $1 in ROWS?
note "bench/gpu.sh: DEVICE=$DEVICE TINY=$TINY STEPS=$STEPS COMPILE=$COMPILE ($(date -u +%FT%TZ))"

# ---- preparation: toy data (each script resizes the images to its model's input), random models,
# the Image-Chat cache (CLIP grid features by the script's --mode features, toy captions)
if [ ! -f "$TOY/manifest.json" ]; then
    $PY data/toy.py --data_only --out "$TOY" > "$LOGS/prep_toy.log" 2>&1 \
        || { note "toy data: FAILED ($LOGS/prep_toy.log)"; exit 1; }
fi
$PY bench/random_models.py --out "$M" --words "$TOY/models_vocab.txt" $MODEL_FLAGS \
    > "$LOGS/prep_models.log" 2>&1 || { note "random models: FAILED ($LOGS/prep_models.log)"; exit 1; }
note "$(tail -1 "$LOGS/prep_models.log") [$(elapsed) s]"
ICW="--preset paper --data_dir $TOY/image_chat --image_root $TOY/image_chat/images
     --cache_dir $OUT/icw_cache --clip $M/clip-vit-base-patch32 --backbone $M/blenderbot-400M-distill"
if ! wants imagechat_warmup; then
    :  # no Image-Chat row, no cache
elif $PY imagechat_warmup.py --mode features $ICW --device "$DEVICE" \
        --out_dir "$OUT/runs/icw_features" > "$LOGS/prep_icw.log" 2>&1 &&
     $PY bench/random_models.py --imagechat_cache "$OUT/icw_cache" --data_dir "$TOY/image_chat" \
        --pairs "$TOY/pairs_train.jsonl" >> "$LOGS/prep_icw.log" 2>&1; then
    note "image-chat cache: CLIP features + toy captions [$(elapsed) s]"
else
    note "image-chat cache: FAILED ($LOGS/prep_icw.log)"
fi

# ---- the rows: name, script, arguments (the compile rows add --compile true)
DATA="--train_file $TOY/pairs_train.jsonl --image_root $TOY"
declare -a NAMES SCRIPTS ARGS
add() { NAMES+=("$1"); SCRIPTS+=("$2"); ARGS+=("$3"); }
add blip2_stage1 blip2_pformer.py "--preset paper --stage 1 --vision_path $M/blip2-vision
    --bert_path $M/bert-base-uncased $DATA --num_workers $WORKERS
    --global_batch $B_BLIP2 --micro_batch $B_BLIP2 $X_BLIP2"
add blip2_stage2_opt blip2_pformer.py "--preset paper --stage 2 --vision_path $M/blip2-vision
    --bert_path $M/bert-base-uncased --llm_path $M/opt-2.7b $DATA --num_workers $WORKERS
    --global_batch $B_BLIP2 --micro_batch $B_BLIP2 $X_BLIP2"
add dlip_pretrain dlip.py "--preset paper --mode pretrain --teacher $M/blip-itm-base-coco
    --teacher_caption $M/blip-image-captioning-base --init_vit $M/deit-small-patch16-224
    --tokenizer $M/bert-base-uncased --train_files $TOY/pairs_train.jsonl --image_root $TOY
    --num_workers $WORKERS --global_batch $B_DLIP --micro_batch $B_DLIP $X_DLIP"
add negclip_train negclip.py "--preset paper --mode train --clip $M/clip-vit-base-patch32 $DATA
    --train_tsv $OUT/runs/negclip_train_neg_clip.tsv --val_file none --workers $WORKERS --mine_prefix=
    --global_batch $B_NEG --micro_batch $B_NEG"
add perceiver_both perceiver_caption.py "--preset paper --mode train
    --clip_model $M/clip-vit-base-patch32 --lm_model $M/gpt2 $DATA
    --val_file $TOY/pairs_val.jsonl --test_file $TOY/pairs_test.jsonl --workers $WORKERS
    --global_batch $B_PERC --micro_batch $B_PERC"
add imagechat_warmup imagechat_warmup.py "--mode warmup $ICW
    --warmup_batch $B_ICW --warmup_micro $B_ICW"

result() { printf '%s\t%s\t%s\t%s\t%s\n' "$@" >> "$RESULTS"; }  # row compile status wall bench

run_row() {  # $1 row index, $2 compile (false | true)
    local i=$1 comp=$2 name=${NAMES[$1]} script=${SCRIPTS[$1]}
    local tag log rc t0 limit status cmd
    wants "$name" || return 0
    if [ "$comp" = true ] && ! grep -qE '^ +compile: bool' "$script"; then
        result "$name" "$comp" "skipped: $script has no --compile flag" 0 ""; return
    fi
    if [ "$comp" = true ] && [ "$COMPILE" != 1 ] && [ "$COMPILE" != only ]; then
        result "$name" "$comp" "skipped: COMPILE=$COMPILE" 0 ""; return
    fi
    [ "$comp" = false ] && [ "$COMPILE" = only ] && return
    limit=$((TOTAL_S - 40 - $(elapsed)))
    [ "$limit" -gt "$ROW_TIMEOUT_S" ] && limit=$ROW_TIMEOUT_S
    if [ "$limit" -lt 30 ]; then
        result "$name" "$comp" "skipped: TOTAL_S=$TOTAL_S nearly spent" 0 ""; return
    fi
    tag="$name$([ "$comp" = true ] && echo _compile)"; log="$LOGS/$tag.log"
    cmd="$PY $script ${ARGS[$i]} --device $DEVICE --bench $STEPS --out_dir $OUT/runs/$tag"
    [ "$comp" = true ] && cmd="$cmd --compile true"
    cmd=$(echo $cmd)  # one line
    echo "$tag: $cmd" >> "$OUT/commands.txt"
    t0=$SECONDS
    timeout "$limit" $cmd > "$log" 2>&1; rc=$?
    status=ok
    [ $rc = 124 ] && status="timeout after $limit s"
    if [ $rc != 0 ] && [ $rc != 124 ]; then
        # the log's last line, without the tabs (results.tsv's separator) and bars (the table's)
        status="failed (rc $rc): $(grep -v '^\s*$' "$log" | tail -1 | tr '\t|' '  ' | cut -c1-100)"
    fi
    grep -q '^bench | ' "$log" || { [ "$status" = ok ] && status="no bench line"; }
    result "$name" "$comp" "$status" $((SECONDS - t0)) "$(grep '^bench | ' "$log" | tail -1)"
    echo "$tag: $status [$((SECONDS - t0)) s, total $(elapsed) s]"
}

for i in "${!NAMES[@]}"; do run_row "$i" false; done  # every eager row first, then compile rows
for i in "${!NAMES[@]}"; do run_row "$i" true; done

# ---- the CUDA-only paths, once each, in a 1-process torchrun (the launcher the scripts run under)
if [ -z "${PATHS_S:-}" ]; then
    PATHS_S=$((TOTAL_S - 5 - $(elapsed))); [ "$PATHS_S" -lt 30 ] && PATHS_S=30
fi
timeout "$PATHS_S" $PY -m torch.distributed.run --nproc_per_node 1 bench/cuda_paths.py \
    --clip "$M/clip-vit-base-patch32" --device "$DEVICE" > "$LOGS/cuda_paths.log" 2>&1
CUDA_RC=$?
[ $CUDA_RC = 124 ] && echo "cuda_path | bench/cuda_paths.py | FAIL | timeout after $PATHS_S s" \
    >> "$LOGS/cuda_paths.log"

# ---- the table (markdown) from results.tsv and the CUDA-path lines
$PY - "$RESULTS" "$LOGS/cuda_paths.log" "$DEVICE" "$TINY" > "$OUT/table.md" <<'EOF'
import sys
import torch
results, paths, device, tiny = sys.argv[1:5]
gpu = device.startswith("cuda") and torch.cuda.is_available()
name = torch.cuda.get_device_name() if gpu else "CPU"
size = "TINY dry run" if tiny == "1" else "paper sizes"
print(f"device: {name}; torch {torch.__version__}; {size}\n")
print("| row | compile | samples/s | samples/s (step only) | ms data | ms step | MFU | peak GiB | wall s | status |")
print("|---|---|---|---|---|---|---|---|---|---|")
for line in open(results):
    row, comp, status, wall, bench = line.rstrip("\n").split("\t")
    fields = dict(f.split(" ", 1) for f in bench.split(" | ")[1:]) if bench else {}
    def num(key, fmt):
        return format(float(fields[key]), fmt) if key in fields else "-"
    cells = [num("samples_s", ".1f"), num("samples_s_step", ".1f"), num("ms_data", ".1f"), num("ms_step", ".1f"),
             num("mfu", ".3f"), num("max_mem_gib", ".1f")]
    print(f"| {row} | {comp} | " + " | ".join(cells) + f" | {wall} | {status} |")
print("\n| CUDA path | status | detail |\n|---|---|---|")
for line in open(paths):
    if line.startswith("cuda_path | "):
        _, check, status, detail = (s.strip() for s in line.split(" | ", 3))
        print(f"| {check} | {status} | {detail} |")
EOF
cat "$OUT/table.md"
note "done in $(elapsed) s; table: $OUT/table.md, commands: $OUT/commands.txt"
FAILED=$(cut -f3 "$RESULTS" | grep -vcE '^(ok|skipped)')
[ "$FAILED" = 0 ] && [ "$CUDA_RC" = 0 ]
