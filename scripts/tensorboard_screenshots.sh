#!/usr/bin/env bash
# Screenshots of TensorBoard's main views on a sweep, for people to look at: `bnexp board`
# serves the sweep, headless Chromium (Debian's `chromium` package) renders each view.
#
#   scripts/tensorboard_screenshots.sh [SWEEP_DIR] [OUT_DIR]
#
# Without SWEEP_DIR it first runs a small demo sweep (16 runs: 4 LRs x BN or not x 2 seeds,
# sigmoid MLPs on the bundled MNIST subset, ~1 min on 2 cores) and `bnexp plot` on it, in a
# temporary outputs root. OUT_DIR (default: ./tensorboard-screenshots) gets one PNG per view:
# timeseries, scalars, custom_scalars, hparams. Headless Chromium draws Time Series cards
# without their lines (its charts render through WebGL in a worker); Scalars shows the curves.
set -euo pipefail

SWEEP=${1:-}
OUT=${2:-tensorboard-screenshots}
BROWSER=$(command -v chromium || command -v chromium-browser || true)
[ -n "$BROWSER" ] || { echo "tensorboard_screenshots: no chromium (apt-get install chromium)" >&2; exit 1; }
command -v bnexp >/dev/null || { echo "tensorboard_screenshots: bnexp is not installed here" >&2; exit 1; }

WORK=$(mktemp -d)
BOARD=
cleanup() {
    # SIGTERM: a background job of a script starts with SIGINT ignored
    [ -n "$BOARD" ] && kill "$BOARD" 2>/dev/null && wait "$BOARD" 2>/dev/null
    rm -rf "$WORK"
}
trap cleanup EXIT

if [ -z "$SWEEP" ]; then
    echo "tensorboard_screenshots: running a demo sweep in $WORK" >&2
    BNEXP_OUTPUTS=$WORK/outputs bnexp sweep --name demo --lr-grid 0.01:3:4 \
        model.norm=batch,none seed=0,1 model.activation=sigmoid trainer.steps=300 \
        trainer.progress=none device=cpu >"$WORK/sweep.log" 2>&1 \
        || { cat "$WORK/sweep.log" >&2; exit 1; }
    SWEEP=$WORK/outputs/sweeps/demo
    bnexp plot "$SWEEP" >/dev/null
fi
[ -d "$SWEEP" ] || { echo "tensorboard_screenshots: no such directory: $SWEEP" >&2; exit 1; }

bnexp board "$SWEEP" --port 0 >"$WORK/board.log" 2>&1 &
BOARD=$!
URL=
for _ in $(seq 120); do
    URL=$(grep -o 'http://[^ ]*' "$WORK/board.log" | head -1 || true)
    [ -n "$URL" ] && break
    sleep 0.5
done
[ -n "$URL" ] || { cat "$WORK/board.log" >&2; exit 1; }
URL=${URL%/}
# TensorBoard reads the event files after it starts: wait until every run is listed.
for _ in $(seq 60); do
    curl -sf "$URL/data/runs" | grep -q '"' && break
    sleep 0.5
done
sleep 3

mkdir -p "$OUT"
for view in timeseries scalars custom_scalars hparams; do
    "$BROWSER" --headless --no-sandbox --enable-unsafe-swiftshader --hide-scrollbars \
        --window-size=1600,1100 --virtual-time-budget=20000 \
        --screenshot="$OUT/$view.png" "$URL/#$view" >/dev/null 2>&1
    echo "$OUT/$view.png"
done
