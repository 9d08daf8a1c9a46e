#!/usr/bin/env bash
# scripts/link_qlora.sh BIN: puts `qlora` on PATH as a link ~/.local/bin/qlora -> BIN (the folder:
# QLR_BIN_DIR), so the README's and the hints' bare `qlora` works. Called by scripts/setup.sh.
# Idempotent. A ~/.local/bin/qlora that is something else (another checkout's build) is left
# alone. It always ends by printing a command that runs BIN: "qlora" when the first qlora on
# PATH is BIN, else BIN's path (and the line to add the folder to PATH when that is the reason).
set -euo pipefail
say() { printf '\033[1m[setup]\033[0m %s\n' "$*"; }
[ $# -eq 1 ] || { echo "usage: scripts/link_qlora.sh BIN" >&2; exit 2; }
BIN=$(realpath "$1") || { echo "[setup] error: $1 does not exist" >&2; exit 1; }
DIR=${QLR_BIN_DIR:-$HOME/.local/bin}
LINK=$DIR/qlora

if [ -L "$LINK" ] && [ "$(realpath "$LINK" 2>/dev/null)" = "$BIN" ]; then
  say "qlora: $LINK -> $BIN"
elif [ -e "$LINK" ] || [ -L "$LINK" ]; then
  say "$LINK is another qlora ($(realpath "$LINK" 2>/dev/null || echo 'a broken link')); left alone" \
      "(replace it with: ln -sfn $BIN $LINK)"
else
  mkdir -p "$DIR"
  ln -s "$BIN" "$LINK"
  say "linked $LINK -> $BIN"
fi

found=$(command -v qlora || true)
if [ -n "$found" ] && [ "$(realpath "$found")" = "$BIN" ]; then
  say "run it as: qlora   (qlora --help lists the commands)"
else
  case ":$PATH:" in
    *":$DIR:"*) ;;
    *) [ "$(realpath "$LINK" 2>/dev/null || true)" = "$BIN" ] &&
         say "$DIR is not on PATH: add it with  export PATH=\"$DIR:\$PATH\"  (e.g. in ~/.profile)" ;;
  esac
  say "run it as: $BIN   (qlora --help lists the commands)"
fi
