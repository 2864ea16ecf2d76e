"""The commands of the ``graphslim`` command line (:mod:`graphslim.cli` puts them in its click group).

One module a kind of command: :mod:`~graphslim.commands.optimize`; :mod:`~graphslim.commands.inspect`
(``inspect``, ``scan``, ``passes``: nothing executed); :mod:`~graphslim.commands.run` (``verify``,
``bench``: models executed in the contained child). Shared by them: :mod:`~graphslim.commands.options`
(click options, loading a model) and :mod:`~graphslim.commands.output` (consoles, progress, tables).
"""
