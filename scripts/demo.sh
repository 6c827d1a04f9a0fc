#!/usr/bin/env bash
# Build a tiny Nunchaku Qwen-Image checkpoint and a LoRA (no downloads), merge them, verify the result.
source "$(dirname "$0")/_env.sh"
OUT="${1:-demo}"
python -m converter.demo "$OUT"
BASE="$OUT/svdq-int4_r32-qwen-image-demo.safetensors"
LORA="$OUT/demo-style-lora.safetensors"
echo; echo "\$ qwenlora-merge $BASE $LORA:0.8 -o $OUT/merged.safetensors --overwrite"
qwenlora-merge "$BASE" "$LORA:0.8" -o "$OUT/merged.safetensors" --overwrite
# no LoRA arguments: verify takes the LoRA and strength the merged file's provenance names (found by sha256)
echo; echo "\$ qwenlora-merge verify $BASE $OUT/merged.safetensors"
qwenlora-merge verify "$BASE" "$OUT/merged.safetensors"
