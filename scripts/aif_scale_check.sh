#!/usr/bin/env bash
# Issue 26: a 1,000-prompt AIF run on CPU with tiny models finishes, and resumes after kill -9.
# Too long for the test suite (minutes on 2 cores), so a script: run it on a quiet machine.
#   1. 1,000 prompts derived from the bundled sample (sample16 x 63 numbered variants, first 1,000),
#      two tiny random pool models (one in process, one served by `transformers serve` on 127.0.0.1),
#      the judge = a third tiny model served locally and constrained to a rating token (one aspect);
#   2. `zephyr-fast aif` is started, SIGKILLed once 500 completions are written, and rerun;
#   3. checks: the rerun generated only what was missing (no (prompt, model) twice in the parts file),
#      1,000 judged rows, pairs written. Prints the wall time of each phase.
# Usage: bash scripts/aif_scale_check.sh [WORK_DIR]   (default: a fresh temporary folder)
set -euo pipefail
cd "$(dirname "$0")/.."
WORK="${1:-$(mktemp -d -t aif-scale-XXXXXX)}"
mkdir -p "$WORK"
export HF_HUB_OFFLINE=1

python - "$WORK" <<'EOF'
import json, sys, yaml
from tests.aif.helpers import save_tiny_model
work = sys.argv[1]
rows = [json.loads(x) for x in open("assets/data/ultrafeedback_binarized/sample16.jsonl")]
with open(f"{work}/prompts.jsonl", "w") as f:
    for k in range(1000):
        r = rows[k % len(rows)]
        f.write(json.dumps({"prompt": f"{r['prompt']} (variant {k // len(rows)})", "source": "ultrachat"}) + "\n")
for name, seed in (("local", 1), ("served", 2), ("judge", 3)):
    save_tiny_model(f"{work}/{name}", seed=seed)
recipe = {"output_dir": f"{work}/aif",
          "generate": {"prompts": f"{work}/prompts.jsonl", "n_models": 2, "max_new_tokens": 8, "batch_size": 16,
                       "concurrency": 8, "pool": {"local": f"{work}/local", "served": {
                           "base_url": "SERVED_URL", "model": f"{work}/served", "api_key": "local",
                           "endpoint_id": "aif-scale-served"}}},
          "judge": {"serve_local": f"{work}/judge", "constrain": True, "temperature": 1.0, "concurrency": 8,
                    "extra_body": {"generation_config": "{\"do_sample\": true}"}, "aspects": ["helpfulness"]}}
open(f"{work}/aif.yaml", "w").write(yaml.safe_dump(recipe))
EOF

PORT=$(python -c "from zephyr_fast.aif.serve import free_port; print(free_port())")
transformers serve "$WORK/served" --host 127.0.0.1 --port "$PORT" --device cpu --log-level warning \
  >"$WORK/served.log" 2>&1 &
SERVER=$!
trap 'kill "$SERVER" 2>/dev/null || true' EXIT
sed -i "s#SERVED_URL#http://127.0.0.1:$PORT/v1#" "$WORK/aif.yaml"
until curl -sf "http://127.0.0.1:$PORT/health" >/dev/null; do sleep 1; done

PARTS="$WORK/aif/completions/completions.parts.jsonl"
START=$(date +%s)
zephyr-fast aif "$WORK/aif.yaml" --no-progress >"$WORK/run1.log" 2>&1 &
RUN=$!
until [ -f "$PARTS" ] && [ "$(wc -l <"$PARTS")" -ge 500 ]; do
  kill -0 "$RUN" 2>/dev/null || { echo "the run ended before 500 completions"; cat "$WORK/run1.log"; exit 1; }
  sleep 0.2
done
kill -9 "$RUN"
wait "$RUN" 2>/dev/null || true
KILLED_AT=$(wc -l <"$PARTS")
echo "killed after $(( $(date +%s) - START )) s with $KILLED_AT completions written"

START=$(date +%s)
zephyr-fast aif "$WORK/aif.yaml" --no-progress | tee "$WORK/run2.log"
echo "rerun finished in $(( $(date +%s) - START )) s"

python - "$WORK" "$KILLED_AT" <<'EOF'
import json, sys
work, killed = sys.argv[1], int(sys.argv[2])
from zephyr_fast.aif.store import iter_sealed
parts = list(iter_sealed(f"{work}/aif/completions/completions.parts.jsonl"))  # a line torn by the kill is skipped
keys = [(p["prompt_id"], p["model"]) for p in parts]
assert len(keys) == len(set(keys)) == 2000, (len(keys), len(set(keys)))
judged = [json.loads(x) for x in open(f"{work}/aif/judged.jsonl")]
assert len(judged) == 1000
log = open(f"{work}/run2.log").read()
assert f"{killed} already done" in log or f"{killed - 1} already done" in log, log  # a torn last line is redone
print(f"OK: 2000 completions (each once), 1000 judged rows, pairs at {work}/aif/pairs.jsonl")
EOF
