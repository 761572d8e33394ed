"""The core of model surgery: what a converted model is and how it runs. Imports plugins only (and
nothing of the hub, the tools or the command line); its public names are re-exported by
``clear_surgery.surgery``."""
