"""Build the documentation site offline, from the notebooks in nbs/, into _site/ (see tools/docs.sh).

The pages are those `nbdev-docs` makes with Quarto, without Quarto: every notebook is executed as `nbdev-test`
executes it (cells flagged with `tst_flags` skipped) and processed by nbdev's own doc processors (`show_doc`
rendered, hidden cells dropped, names linked), then turned into one HTML page by markdown-it-py (Markdown),
latex2mathml (formulas, as MathML: no JavaScript, no network) and Pygments (code). The navigation is nbs/sidebar.yml,
the file Quarto reads too. Executed and processed notebooks are cached in _proc/ and redone when the notebook or the
library changes.
"""
from __future__ import annotations
import argparse, hashlib, html, json, posixpath, re, shutil, sys, time, warnings
from pathlib import Path
import yaml
from fastcore.parallel import parallel
from fastcore.nbio import read_nb, write_nb
from nbdev.config import get_config
from nbdev.doclinks import nbglob

TUTORIALS = ['linear', 'conv_methods', 'callback', 'ranks', 'data_aware', 'export']  # reading order; others follow by name
EXPLANATIONS = ['explanations', 'untouched', 'layout']
IMAGES = ('.png', '.jpg', '.jpeg', '.gif', '.svg', '.webp')

# ---------------------------------------------------------------- navigation
def page_order(nbs:Path)->list[tuple[str,list[str]]]:
    "Sections of the site as (title, [notebook paths relative to `nbs`]): the index, tutorials, explanations, API"
    rels = sorted(str(p.relative_to(nbs)) for p in nbglob(nbs, as_path=True))
    rank = lambda names: (lambda r: (names.index(Path(r).stem) if Path(r).stem in names else len(names), r))
    tut = sorted([r for r in rels if r.startswith('tutorials/') and Path(r).stem not in EXPLANATIONS], key=rank(TUTORIALS))
    expl = [r for r in rels if Path(r).stem in EXPLANATIONS]
    api = [r for r in rels if '/' not in r and r!='index.ipynb']
    rest = [r for r in rels if r not in {'index.ipynb', *tut, *expl, *api}]
    return [(t, rs) for t,rs in [('', ['index.ipynb'] if 'index.ipynb' in rels else []), ('Tutorials', tut),
                                  ('Explanations', expl), ('API', api), ('More', rest)] if rs]

def write_sidebar(nbs:Path, order)->Path:
    "nbs/sidebar.yml in Quarto's format (used by `nbdev-docs` with `custom_sidebar = true`, and by this build)"
    contents = [c for t,rs in order for c in (rs if not t else [dict(section=t, contents=rs)])]
    text = yaml.dump({'website': {'sidebar': {'contents': contents}}}, sort_keys=False)
    p = nbs/'sidebar.yml'
    if not p.exists() or p.read_text() != text: p.write_text(text)
    return p

# ---------------------------------------------------------------- execute and process
def _key(src:Path, lib:Path, flags)->str:
    import nbdev
    h = hashlib.sha1(src.read_bytes() + repr([flags, nbdev.__version__]).encode())
    for f in sorted(lib.glob('*.py')): h.update(f.read_bytes())
    return h.hexdigest()

def build_one(rel:str, nbs:Path, proc:Path, lib:Path, flags:list, execute:bool=True, timeout:int=600, fresh:bool=False):
    "Execute `rel` (a copy of it, in _proc/_exec/) as nbdev-test does, then process it for the docs: (rel, error or None, seconds)"
    from nbdev.test import test_nb
    from nbdev.processors import FilterDefaults
    t0,src,ex,out = time.time(),nbs/rel,proc/'_exec'/rel,proc/rel
    key,kf = _key(src, lib, [flags, execute]),proc/'_exec'/(rel+'.key')
    if not fresh and out.exists() and kf.exists() and kf.read_text()==key: return rel, None, 0.
    ex.parent.mkdir(parents=True, exist_ok=True); out.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(src, ex)
    if execute:
        ok,_ = test_nb(ex, skip_flags=flags, save=True, basepath=str(nbs.parent), cell_timeout=timeout)
        if not ok: return rel, 'a cell failed to execute (traceback above)', time.time()-t0
    with warnings.catch_warnings(record=True) as said:  # nbdev's advice on cells that mix imports and code: shown only if it matters
        warnings.simplefilter('always')
        try:
            nb = read_nb(ex)
            FilterDefaults()(nb)
            write_nb(nb, out)
        except Exception as e: return rel, f'nbdev could not process it for the docs: {e}' + _mixed_hint(e, said), time.time()-t0
    kf.write_text(key)
    return rel, None, time.time()-t0

_MIXED = 'Found cells containing imports and other code'
def _mixed_hint(e:Exception, said)->str:
    "Why a cell that ran in the notebook fails in nbdev's doc processing, when that is the reason"
    src = str(e).split(' :\n', 1)[-1].rsplit('\n', 1)[0].strip()
    if not src or not any(_MIXED in str(w.message) and src in str(w.message) for w in said): return ''
    return ("\n  Why: this cell mixes imports with other code. nbdev's doc processor (exec_show_docs, which `nbdev-docs` runs too)"
            "\n  executes every cell that holds an import, with the export and show_doc cells, in a fresh kernel and without"
            "\n  the notebook's other cells, so names that those define are missing. Fix: put the import in a cell of its own.")

# ---------------------------------------------------------------- Markdown, math, code
def slug(text:str)->str:
    "Pandoc's (so Quarto's) identifier of a heading: the ids nbdev's links point at"
    s = re.sub(r'[^\w\s.-]', '', text.strip().lower())
    s = re.sub(r'\s+', '-', s)
    s = re.sub(r'^[^a-z]+', '', s)
    return s or 'section'

def _math(tex:str, opts:dict)->str:
    from latex2mathml.converter import convert
    try: return convert(tex, display='block' if opts.get('display_mode') else 'inline')
    except Exception: return f'<code class="tex">{html.escape(tex)}</code>'

def _highlight(code:str, lang:str='python', attrs='')->str:
    from pygments import highlight
    from pygments.lexers import get_lexer_by_name
    from pygments.formatters import HtmlFormatter
    from pygments.util import ClassNotFound
    try: lexer = get_lexer_by_name(lang or 'text')
    except ClassNotFound: lexer = get_lexer_by_name('text')
    return highlight(code, lexer, HtmlFormatter(nowrap=False, cssclass='highlight'))

def markdown():
    from markdown_it import MarkdownIt
    from mdit_py_plugins.dollarmath import dollarmath_plugin
    from mdit_py_plugins.attrs import attrs_plugin
    from mdit_py_plugins.anchors import anchors_plugin
    from mdit_py_plugins.footnote import footnote_plugin
    md = (MarkdownIt('commonmark', {'html': True}).enable(['table', 'strikethrough'])
          .use(dollarmath_plugin, renderer=_math, allow_digits=False, double_inline=True).use(attrs_plugin)
          .use(anchors_plugin, min_level=1, max_level=6, slug_func=slug).use(footnote_plugin))
    md.add_render_rule('fence', lambda self, tokens, idx, options, env: _highlight(tokens[idx].content, tokens[idx].info.split()[0] if tokens[idx].info.strip() else 'text'))
    return md

_FENCED_DIV = re.compile(r'^:::.*$', re.M)
def render_md(md, text:str)->str:
    "HTML of Quarto Markdown `text` (fenced `:::` divs dropped, their content kept)"
    return md.render(_FENCED_DIV.sub('', text))

# ---------------------------------------------------------------- cells and outputs
_ANSI = re.compile(r'\x1b\[[0-9;?]*[A-Za-z]')
_BAR = re.compile(r'^[^|\n]*\|[█-]+\| [\d.]+% \[[^\]]*\]')  # a console progress bar that a line written after it did not clear
def terminal(text:str)->str:
    "What a terminal shows of `text`: ANSI codes dropped, each line as its last carriage return left it (progress bars)"
    lines = [_BAR.sub('', l.rsplit('\r', 1)[-1]).rstrip() for l in _ANSI.sub('', text).split('\n')]
    return re.sub(r'\n{3,}', '\n\n', '\n'.join(l for l in lines if l.strip() or not l) ).strip('\n')

def _src(x): return ''.join(x) if isinstance(x, list) else (x or '')

def directives(source:str)->tuple[dict,str]:
    "Quarto's `#| key: value` cell options and the code without them"
    d,lines = {},source.split('\n')
    while lines and lines[0].startswith('#|'):
        k,_,v = lines.pop(0)[2:].partition(':')
        d[k.strip()] = v.strip().lower()
    return d, '\n'.join(lines).strip('\n')

def render_output(md, o, asis=False)->str:
    kind = o.get('output_type')
    if kind == 'stream':
        t = terminal(_src(o.get('text')))
        return f'<pre class="output {o.get("name","stdout")}">{html.escape(t)}</pre>' if t else ''
    if kind == 'error': return f'<pre class="output error">{html.escape(terminal(chr(10).join(o.get("traceback", []))))}</pre>'
    d = o.get('data', {})
    if asis and 'text/markdown' in d: return f'<div class="output asis">{render_md(md, _src(d["text/markdown"]))}</div>'
    if 'text/html' in d:
        h = _src(d['text/html'])
        return f'<div class="output html">{h}</div>' if h.strip() else ''
    if 'image/svg+xml' in d: return f'<div class="output image">{_src(d["image/svg+xml"])}</div>'
    for mime in ('image/png', 'image/jpeg', 'image/gif'):
        if mime in d: return f'<div class="output image"><img src="data:{mime};base64,{_src(d[mime]).strip()}" alt="output image"></div>'
    if 'text/markdown' in d: return f'<div class="output markdown">{render_md(md, _src(d["text/markdown"]))}</div>'
    if 'text/latex' in d: return f'<div class="output math">{_math(_src(d["text/latex"]).strip("$"), dict(display_mode=True))}</div>'
    if 'text/plain' in d: return f'<pre class="output plain">{html.escape(terminal(_src(d["text/plain"])))}</pre>'
    return ''

def render_cell(md, cell)->str:
    src = _src(cell.get('source'))
    if cell['cell_type'] == 'markdown': return render_md(md, src) if src.strip() else ''
    if cell['cell_type'] != 'code': return ''
    d,code = directives(src)
    if d.get('include') == 'false' or not (code or cell.get('outputs')): return ''
    parts = []
    if code and d.get('echo') != 'false':
        block = f'<div class="input">{_highlight(code)}</div>'
        fold = d.get('code-fold')
        parts.append(f'<details class="fold"{" open" if fold=="show" else ""}><summary>{html.escape(d.get("code-summary", "Code").strip(chr(34)))}</summary>{block}</details>'
                     if fold in ('true', 'show') else block)
    if d.get('output') != 'false':
        parts += [render_output(md, o, asis=d.get('output')=='asis') for o in cell.get('outputs', [])]
    parts = [p for p in parts if p]
    return f'<div class="cell">{"".join(parts)}</div>' if parts else ''

def frontmatter(nb)->dict:
    c = next((c for c in nb['cells'] if c['cell_type']=='raw' and _src(c['source']).lstrip().startswith('---')), None)
    return (yaml.safe_load(_src(c['source']).strip().strip('-')) or {}) if c else {}

# ---------------------------------------------------------------- pages
def page_path(rel:str, fm:dict)->str:
    "Where Quarto puts the page of notebook `rel`: its `output-file`, beside the notebook"
    p = Path(rel)
    return str(p.parent/(fm.get('output-file') or p.with_suffix('.html').name))

def relative(target:str, here:str)->str:
    "`target` (a path in the site; '' for its root) as a link from page `here`"
    if not target: return '../'*len(Path(here).parent.parts)
    return posixpath.relpath(target, posixpath.dirname(here) or '.')

_LINK = re.compile(r'(href|src)="([^"#?]*)([^"]*)"')
def fix_links(body:str, here_nb:str, here:str, pages:dict, doc_url:str)->str:
    "Links to the deployed site and to notebooks, as relative links between the pages of this build"
    def f(m):
        attr,url,rest = m.groups()
        if doc_url and url.startswith(doc_url):
            t = url[len(doc_url):].lstrip('/') or 'index.html'
            if t.endswith('.html.md'): t = t[:-3]
            return f'{attr}="{relative(t, here)}{rest}"'
        if url.endswith('.ipynb') and not re.match(r'^[a-z]+:', url):
            t = _norm(f"{Path(here_nb).parent.as_posix()}/{url}")
            if t in pages: return f'{attr}="{relative(pages[t], here)}{rest}"'
        return m.group(0)
    return _LINK.sub(f, body)

def _norm(p:str)->str:
    out = []
    for part in p.split('/'):
        if part == '..': out = out[:-1]
        elif part not in ('', '.'): out.append(part)
    return '/'.join(out)

def headings(body:str)->list[tuple[int,str,str]]:
    "The page's h2 and h3 headings as (level, id, text)"
    return [(int(l), i, re.sub(r"<[^>]+>", "", t)) for l,i,t in re.findall(r'<h([23]) id="([^"]+)"[^>]*>(.*?)</h\1>', body, re.S)]

def toc(body:str)->str:
    "The page's table of contents, in the right-hand column (on wide windows: see tools/docs.css)"
    hs = headings(body)
    if len(hs) < 2: return ''
    items = ''.join(f'<li class="toc-h{l}"><a href="#{i}">{t}</a></li>' for l,i,t in hs)
    return f'<nav class="toc"><div class="toc-title">On this page</div><ul>{items}</ul></nav>'

def side_toc(body:str)->str:
    "The page's sections (its h2, else its h3), under its entry in the sidebar: the contents where the window is too narrow for the right-hand column"
    hs = headings(body)
    top = [h for h in hs if h[0]==2] or hs
    if len(top) < 2: return ''
    return '<ul class="page-toc">' + ''.join(f'<li><a href="#{i}">{t}</a></li>' for _,i,t in top) + '</ul>'

def nav(order, titles:dict, pages:dict, here_nb:str, here:str, here_toc:str='')->str:
    out = []
    for sec,rels in order:
        items = ''.join(f'<li class=active><a href="{relative(pages[r], here)}">{html.escape(titles[r])}</a>{here_toc}</li>' if r==here_nb else
                        f'<li><a href="{relative(pages[r], here)}">{html.escape(titles[r])}</a></li>' for r in rels)
        out.append((f'<div class="nav-section">{html.escape(sec)}</div>' if sec else '') + f'<ul>{items}</ul>')
    return ''.join(out)

TEMPLATE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title} – {site}</title><meta name="description" content="{description}">
<link rel="stylesheet" href="{root}site.css"></head>
<body><header class="topbar"><a class="brand" href="{root}index.html">{site}</a><span class="tagline">{tagline}</span>
<a class="repo" href="{repo}">GitHub</a></header>
<div class="layout"><aside class="sidebar">{nav}</aside>
<main class="content"><header class="page-header"><h1 class="title">{title}</h1>{desc_html}</header>
{body}
<footer class="page-footer">Built from <code>nbs/{source}</code> by <code>tools/docs.sh</code>.</footer></main>
{toc}</div></body></html>
"""

def render_site(proc:Path, nbs:Path, out:Path, order, cfg):
    md = markdown()
    rels = [r for _,rs in order for r in rs]
    nbs_ = {r: json.loads((proc/r).read_text()) for r in rels}
    fms = {r: frontmatter(nb) for r,nb in nbs_.items()}
    pages = {r: page_path(r, fms[r]) for r in rels}
    titles = {r: fms[r].get('title') or Path(r).stem for r in rels}
    if 'index.ipynb' in titles: titles['index.ipynb'] = 'Home'
    doc_url = f"{cfg.doc_host}{cfg.doc_baseurl}".rstrip('/') if cfg.get('doc_host') else ''
    for r in rels:
        here,fm = pages[r],fms[r]
        body = ''.join(render_cell(md, c) for c in nbs_[r]['cells'])
        body = fix_links(body, r, here, pages, doc_url)
        desc = fm.get('description', '')
        page = TEMPLATE.format(title=html.escape(fm.get('title') or titles[r]), site=html.escape(cfg.title), tagline=html.escape(cfg.get('description', '')),
                               description=html.escape(re.sub(r'[`*]', '', desc)), desc_html=f'<div class="description">{md.renderInline(desc)}</div>' if desc else '',
                               root=relative('', here), repo=cfg.get('git_url', '#'), nav=nav(order, titles, pages, r, here, side_toc(body)),
                               body=body, toc=toc(body), source=r)
        (out/here).parent.mkdir(parents=True, exist_ok=True)
        (out/here).write_text(page)
    for f in nbs.rglob('*'):  # images that pages refer to, where the pages are
        if f.suffix.lower() in IMAGES and not any(p.startswith(('.', '_')) for p in f.relative_to(nbs).parts):
            (out/f.relative_to(nbs)).parent.mkdir(parents=True, exist_ok=True); shutil.copy2(f, out/f.relative_to(nbs))
    from pygments.formatters import HtmlFormatter
    (out/'site.css').write_text((Path(__file__).parent/'docs.css').read_text() + HtmlFormatter(style='friendly').get_style_defs('.highlight'))
    return pages

# ---------------------------------------------------------------- README
README_MARK = '<!-- README.md is written from nbs/index.ipynb by tools/readme.sh: edit the notebook, not this file -->'
_REL = re.compile(r'\]\((?![a-z][a-z0-9+.-]*:|#|/)([^)\s]+)\)')

def readme(index:Path)->str:
    "README.md from `index` (nbs/index.ipynb): its Markdown, and its code cells as Python blocks (hidden cells left out); links made relative to the repository"
    parts = []
    for c in json.loads(index.read_text())['cells']:
        src = _src(c['source']).strip()
        if c['cell_type'] == 'markdown' and src: parts.append(_REL.sub(lambda m: f'](nbs/{m.group(1)})', src))
        elif c['cell_type'] == 'code':
            d,code = directives(src)
            if code and not ({'hide', 'hide_input'} & d.keys() or d.get('include')=='false' or d.get('echo')=='false'):
                parts.append(f"```python\n{code}\n```")
    return '\n\n'.join(parts) + f'\n\n{README_MARK}\n'

# ---------------------------------------------------------------- main
def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--out', default='_site', help='where to write the site')
    ap.add_argument('--no-exec', action='store_true', help="render the outputs stored in the notebooks instead of executing them")
    ap.add_argument('--n-workers', type=int, default=2, help='notebooks executed at once')
    ap.add_argument('--flags', default='', help='tst_flags to run anyway (as nbdev-test --flags)')
    ap.add_argument('--fresh', action='store_true', help='execute every notebook, cached or not (tools/test.sh: the build is its notebook test)')
    ap.add_argument('--readme', metavar='PATH', help='only write the README made from nbs/index.ipynb to PATH (tools/readme.sh)')
    a = ap.parse_args(argv)
    cfg = get_config()
    if a.readme:
        Path(a.readme).write_text(readme(cfg.nbs_path/'index.ipynb'))
        return print(f"wrote {a.readme} from {cfg.nbs_path.name}/index.ipynb") or 0
    root,t0 = cfg.config_path,time.time()
    nbs,proc,out,lib = cfg.nbs_path,root/'_proc',(root/a.out).resolve(),cfg.lib_path
    flags = [f for f in str(cfg.get('tst_flags', '')).replace('|', ' ').split() if f not in a.flags.split()]
    order = page_order(nbs)
    write_sidebar(nbs, order)
    rels = [r for _,rs in order for r in rs]
    print(f"{len(rels)} notebooks: executing and processing ({a.n_workers} at a time)" + (' (stored outputs)' if a.no_exec else ''), flush=True)
    res = parallel(build_one, rels, nbs=nbs, proc=proc, lib=lib, flags=flags, execute=not a.no_exec, fresh=a.fresh,
                   timeout=cfg.get('cell_timeout', 600), n_workers=a.n_workers, threadpool=False)
    for rel,err,t in res: print(f"  {rel:<34} {'cached' if t==0 and not err else f'{t:5.1f}s'}{'  FAILED: '+err if err else ''}")
    failed = [(r,e) for r,e,_ in res if e]
    ok = [[r for r in rs if r not in dict(failed)] for _,rs in order]
    order = [(s, rs) for (s,_),rs in zip(order, ok) if rs]
    if out.exists(): shutil.rmtree(out)
    out.mkdir(parents=True)
    pages = render_site(proc, nbs, out, order, cfg)
    shown = out.relative_to(root.resolve()) if out.is_relative_to(root.resolve()) else out  # --out may be outside the project
    print(f"{len(pages)} pages in {shown}/ ({time.time()-t0:.0f}s); open {shown}/index.html")
    if failed:
        print(f"{len(failed)} notebook(s) left out of the site: " + ', '.join(r for r,_ in failed), file=sys.stderr)
        return 1
    return 0

if __name__ == '__main__':  # run as the module `docs`, so that the worker processes find `build_one` by name
    sys.path.insert(0, str(Path(__file__).parent))
    import docs
    sys.exit(docs.main())
