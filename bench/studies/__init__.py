"""Studies: one-off measurements that settled a design question (where gradients live, where a
step's time goes, the clip's read floor, the narrow moments' speed, each mode's memory). Each
finding and the command that reproduced it is in bench/RESULTS.md; `python -m bench` does not
run them (`python -m bench gpu` runs the breakdown and the gradient layouts).
"""
