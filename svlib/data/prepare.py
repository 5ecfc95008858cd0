"""Moved to ``svlib.corpora.prepare``; this alias keeps ``python -m svlib.data.prepare ...`` working."""
if __name__ == "__main__":
    import runpy  # not an import of svlib.corpora: the data layer never imports corpus preparation

    runpy.run_module("svlib.corpora.prepare", run_name="__main__", alter_sys=True)
