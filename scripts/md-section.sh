#!/usr/bin/env bash
# md-section.sh FILE NAME < CONTENT: replaces the block between `<!-- BEGIN NAME -->` and
# `<!-- END NAME -->` in FILE with CONTENT (appending the block if FILE lacks it), so that each
# benchmark script owns its own section of docs/benchmarks.md.
set -euo pipefail
file=$1 name=$2
content=$(cat)
[ -f "$file" ] || printf '# Benchmarks\n\nEach section is rewritten by the script named in it; nothing is typed in.\n' > "$file"
python3 - "$file" "$name" "$content" <<'PY'
import sys
path, name, content = sys.argv[1], sys.argv[2], sys.argv[3]
begin, end = f"<!-- BEGIN {name} -->", f"<!-- END {name} -->"
text = open(path).read()
block = f"{begin}\n{content.rstrip()}\n{end}"
if begin in text and end in text:
    a = text.index(begin)
    b = text.index(end) + len(end)
    text = text[:a] + block + text[b:]
else:
    text = text.rstrip() + "\n\n" + block + "\n"
open(path, "w").write(text)
PY
