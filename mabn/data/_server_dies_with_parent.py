"""The loader fork server's preload: importing this module makes the importing process die with its parent.

Only the fork server imports it (``loaders._preload``): a trainer must not (``nohup`` and friends rely on a
process outliving its parent).
"""

from ._die_with_parent import die_with_parent

die_with_parent()
