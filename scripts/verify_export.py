"""An exported student, loaded as a user without bcllm would load it, against bcllm's own load.

    python scripts/verify_export.py STUDENT_DIR EXPORTED_DIR

A child process with bcllm blocked (sys.modules["bcllm"] = None), no terminal (stdin from
/dev/null) and HF_HUB_OFFLINE=1 loads tokenizer and model from EXPORTED_DIR (`bcllm export`'s
folder) and writes its logits on three prompts; this process loads STUDENT_DIR with
bcllm.load_student and prints the largest logit difference and whatever the child printed.
"""

import os
import subprocess
import sys
import tempfile
import time

import torch

PROMPTS = ["Write a Python function that reverses a string.", "What is the capital of France?",
           "Once upon a time, in a quiet village,"]
CHILD = r'''
import sys, torch
sys.modules["bcllm"] = None
from transformers import AutoModelForCausalLM, AutoTokenizer
tok = AutoTokenizer.from_pretrained(sys.argv[1])
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True).eval()
with torch.no_grad():
    torch.save([model(**tok(p, return_tensors="pt")).logits[0] for p in sys.argv[3:]], sys.argv[2])
'''


def main() -> None:
    if len(sys.argv) != 3:
        raise SystemExit(__doc__)
    student_dir, exported = sys.argv[1:]
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "logits.pt")
        start = time.time()
        child = subprocess.run([sys.executable, "-c", CHILD, exported, out, *PROMPTS], stdin=subprocess.DEVNULL,
                               capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        print(f"child (bcllm blocked, no terminal): exit {child.returncode} in {time.time() - start:.1f} s; "
              f"printed {len(child.stdout) + len(child.stderr)} characters")
        if child.returncode:
            raise SystemExit(child.stderr[-2000:])
        print(child.stdout[-1000:] + child.stderr[-1000:], end="")
        got = torch.load(out)
    from bcllm.io.artifact import load_student

    student, tokenizer, summary = load_student(student_dir)
    with torch.no_grad():
        worst = max((student(**tokenizer(p, return_tensors="pt")).logits[0] - g).abs().max().item()
                    for p, g in zip(PROMPTS, got))
    print(f"{len(summary['modules'])} structured modules; largest |logit difference|, exported against bcllm: {worst:.3g}")


if __name__ == "__main__":
    main()
