"""``python -m edgexfer``: the ``edgexfer`` command (also what ``torchrun -m edgexfer`` starts)."""
from edgexfer.cli import main

if __name__ == "__main__":
    main()
