"The documentation: the pieces of tools/docs.py (fast), and the site built by tools/docs.sh and opened in headless Chromium (slow)"
import base64, html, importlib.util, json, os, re, shutil, subprocess, sys, tempfile, time
from concurrent.futures import ThreadPoolExecutor
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlsplit
import pytest

ROOT = Path(__file__).resolve().parents[1]
NBS = ROOT/'nbs'
spec = importlib.util.spec_from_file_location('docs', ROOT/'tools'/'docs.py')
docs = importlib.util.module_from_spec(spec); spec.loader.exec_module(docs)

# ---------------------------------------------------------------- the pieces
@pytest.mark.parametrize('heading,id', [('FC_Decomposer.decompose', 'fc_decomposer.decompose'), ('A small MLP on digits', 'a-small-mlp-on-digits'),
                                        ("VGG-16's head", 'vgg-16s-head'), ('1. Intro', 'intro'), ('Conv_Decomposer', 'conv_decomposer')])
def test_slug_is_pandocs(heading, id): assert docs.slug(heading) == id, heading

@pytest.mark.parametrize('raw,shown', [
    ('epoch  loss\n█\r\rEpoch 1/2 : |----| 0.00% [0/14 00:00<?]\rEpoch 1/2 : |████| 100.00% [14/14 00:00<00:00]\r      \r0  1.5\n', 'epoch  loss\n0  1.5'),
    ('Epoch 5/8 : |------| 0.00% [0/14 00:00<?]DecomposeCallback at epoch 4\n', 'DecomposeCallback at epoch 4'),
    ('\x1b[31mred\x1b[0m text\n\n\n\nend', 'red text\n\nend')])
def test_terminal_shows_what_a_terminal_shows(raw, shown): assert docs.terminal(raw) == shown, repr(raw)

@pytest.mark.parametrize('url,nb,page,out', [
    ('https://x.io/lib/decompose.html#fc_decomposer', 'tutorials/linear.ipynb', 'tutorials/linear.html', '../decompose.html#fc_decomposer'),
    ('https://x.io/lib/decompose.html', '03_decompose.ipynb', 'decompose.html', 'decompose.html'),
    ('conv_methods.ipynb', 'tutorials/linear.ipynb', 'tutorials/linear.html', 'conv_methods.html'),
    ('../03_decompose.ipynb#a', 'tutorials/linear.ipynb', 'tutorials/linear.html', '../decompose.html#a'),
    ('tutorials/linear.ipynb', 'index.ipynb', 'index.html', 'tutorials/linear.html'),
    ('https://pytorch.org/docs', 'index.ipynb', 'index.html', 'https://pytorch.org/docs')])
def test_links_between_pages(url, nb, page, out):
    pages = {'index.ipynb': 'index.html', '03_decompose.ipynb': 'decompose.html', 'tutorials/linear.ipynb': 'tutorials/linear.html',
             'tutorials/conv_methods.ipynb': 'tutorials/conv_methods.html'}
    assert docs.fix_links(f'<a href="{url}">x</a>', nb, page, pages, 'https://x.io/lib') == f'<a href="{out}">x</a>', (url, nb)

def test_cells_render_as_quarto_would():
    md = docs.markdown()
    png = base64.b64encode(b'\x89PNG\r\n\x1a\n' + b'0'*64).decode()
    cell = lambda src, *outs: dict(cell_type='code', source=src, outputs=list(outs))
    shown = docs.render_cell(md, cell('#| echo: false\n#| output: asis\nshow_doc(f)', dict(output_type='execute_result', data={'text/markdown': '### f\n\n*does $x^2$*', 'text/plain': 'f'})))
    assert 'show_doc' not in shown and '<h3 id="f">f</h3>' in shown and '<math' in shown, shown
    shown = docs.render_cell(md, cell('plt.plot([1])', dict(output_type='display_data', data={'image/png': png, 'text/plain': '<Figure>'})))
    assert f'src="data:image/png;base64,{png}"' in shown and '<Figure>' not in shown, shown
    assert docs.render_cell(md, cell('#| include: false\nx = 1')) == ''
    assert 'class="highlight"' in docs.render_md(md, '```bash\nls\n```') and '<pre><code' not in docs.render_md(md, '```bash\nls\n```')

def test_every_notebook_has_one_place_in_the_navigation():
    order = [r for _,rs in docs.page_order(NBS) for r in rs]
    nbs = sorted(str(p.relative_to(NBS)) for p in NBS.rglob('*.ipynb') if not any(q.startswith(('.', '_')) for q in p.relative_to(NBS).parts))
    assert sorted(order) == nbs and len(set(order)) == len(order), (order, nbs)
    assert order[0] == 'index.ipynb'

def test_every_cell_has_a_fixed_id():
    "nbdev-export heads each exported cell with its id; a cell without one is given a random id at each read, so the export would never match"
    missing = [f"{p.relative_to(NBS)} cell {i}" for p in sorted(NBS.rglob('*.ipynb')) if '.ipynb_checkpoints' not in p.parts
               for i,c in enumerate(json.loads(p.read_text())['cells']) if not c.get('id')]
    assert not missing, f"cells without an id (add one, e.g. 8 hex digits): {missing}"

def test_readme_is_written_from_the_index():
    text = docs.readme(NBS/'index.ipynb')
    assert text.startswith('# fasterai_lr\n\n```bash\nbash tools/setup.sh && .venv/bin/fasterai_lr demo'), "the README must open with the two newcomer commands"
    assert 'bash tools/setup.sh && bash tools/test.sh' in text.split('\n```', 2)[1]
    for link in re.findall(r'\]\(([^)#:]+)\)', text): assert (ROOT/link).exists(), f"README link {link} points at nothing"
    readme = (ROOT/'README.md').read_text()
    if docs.README_MARK not in readme: pytest.skip("README.md is not generated from nbs/index.ipynb yet (bash tools/readme.sh)")
    assert readme == text, "README.md is out of date with nbs/index.ipynb: run bash tools/readme.sh"

def test_sections_in_the_sidebar():
    body = '<h2 id="a">A</h2><p>x</p><h3 id="a1">A.1</h3><h2 id="b">B <code>b</code></h2>'
    side = docs.side_toc(body)
    assert side == '<ul class="page-toc"><li><a href="#a">A</a></li><li><a href="#b">B b</a></li></ul>', side
    assert docs.side_toc('<h2 id="a">A</h2>') == '' and 'href="#a1"' in docs.toc(body)
    order,pages = [('', ['index.ipynb'])],{'index.ipynb': 'index.html'}
    assert side in docs.nav(order, {'index.ipynb': 'Home'}, pages, 'index.ipynb', 'index.html', side)

def test_a_cell_mixing_imports_and_code_is_explained(tmp_path):
    "nbdev's doc processing runs every cell with an import alone: when that breaks the build, the build says why"
    nbs = tmp_path/'nbs'; nbs.mkdir()
    cell = lambda src: dict(cell_type='code', execution_count=None, id=f'c{abs(hash(src))}', metadata={}, outputs=[], source=src)
    nb = dict(cells=[cell('#| export\ndef f(): "A function, so that nbdev documents the notebook"'), cell('x = 1'), cell('import math\nprint(math.pi + x)')],
              metadata={}, nbformat=4, nbformat_minor=5)
    (nbs/'mixed.ipynb').write_text(json.dumps(nb))
    rel,err,_ = docs.build_one('mixed.ipynb', nbs, tmp_path/'_proc', ROOT/'fasterai_lr', [], execute=False)
    assert err and "NameError: name 'x' is not defined" in err and 'put the import in a cell of its own' in err, err

# ---------------------------------------------------------------- the site in a browser
CHROMIUM = next((shutil.which(b) for b in ('chromium', 'chromium-browser', 'google-chrome') if shutil.which(b)), None)
FLAGS = ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run', '--disable-background-networking',
         '--disable-component-update', '--disable-sync', '--hide-scrollbars']

@pytest.fixture(scope='module')
def browser():
    "Chromium, or a skip (a failure where FASTERAI_LR_REQUIRE_CHROMIUM is set, as .ci/run sets it: there the site must be opened)"
    if CHROMIUM: return CHROMIUM
    msg = "no Chromium (chromium, chromium-browser or google-chrome on PATH): apt-get install chromium to open the site in a browser"
    if os.environ.get('FASTERAI_LR_REQUIRE_CHROMIUM'): pytest.fail(msg)
    pytest.skip(msg)

def chromium(url:str, *args, timeout=90)->str:
    "stdout of headless Chromium on `url`, with a fresh profile"
    with tempfile.TemporaryDirectory() as profile:
        r = subprocess.run([CHROMIUM, *FLAGS, f'--user-data-dir={profile}', *args, url], capture_output=True, text=True, timeout=timeout)
    return r.stdout

class Refs(HTMLParser):
    "The links, images, ids and title of a page"
    def __init__(self):
        super().__init__(); self.links,self.imgs,self.ids,self.h1,self._in_h1 = [],[],set(),'',False
    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if 'id' in a: self.ids.add(a['id'])
        if tag == 'a' and a.get('href'): self.links.append(a['href'])
        if tag in ('link', 'script') and (a.get('href') or a.get('src')): self.links.append(a.get('href') or a.get('src'))
        if tag == 'img': self.imgs.append(a.get('src', ''))
        self._in_h1 |= tag == 'h1'
    def handle_endtag(self, tag): self._in_h1 &= tag != 'h1'
    def handle_data(self, data):
        if self._in_h1: self.h1 += data

def parse(text:str)->Refs:
    p = Refs(); p.feed(text); return p

@pytest.fixture(scope='module')
def site():
    "The site, built by the README's command (cached notebooks are reused; a fresh checkout executes them all)"
    t = time.time()
    r = subprocess.run(['bash', str(ROOT/'tools'/'docs.sh')], cwd=ROOT, capture_output=True, text=True, timeout=1800)
    print(f"\nbash tools/docs.sh: {time.time()-t:.0f}s\n" + r.stdout[-3000:])
    assert r.returncode == 0, f"the site build failed:\n{r.stdout[-4000:]}\n{r.stderr[-4000:]}"
    return ROOT/'_site'

def expected_pages()->dict:
    "{notebook: its page}: the name nbdev gives the page of each notebook (`output-file`: no number prefix)"
    from nbdev.config import nbpath2html
    return {r: str(nbpath2html(r)) for _,rs in docs.page_order(NBS) for r in rs}

@pytest.mark.slow
def test_site_in_chromium(browser, site):
    pages = expected_pages()
    missing = [p for p in pages.values() if not (site/p).exists()]
    assert not missing, f"pages not built: {missing}"
    with ThreadPoolExecutor(2) as ex: doms = dict(zip(pages.values(), ex.map(lambda p: chromium((site/p).as_uri(), '--dump-dom'), pages.values())))
    problems = []
    for nb,page in pages.items():
        dom = parse(doms[page])
        if 'class="content"' not in doms[page] or not dom.h1.strip(): problems.append(f"{page}: did not load (no title in the DOM)"); continue
        for href in dom.links:
            u = urlsplit(href)
            if u.scheme in ('http', 'https', 'mailto', 'data', 'javascript'): continue
            target = (site/page).parent/unquote(u.path) if u.path else site/page
            if not target.resolve().exists(): problems.append(f"{page}: link to {href}: no such file"); continue
            if u.fragment and target.suffix == '.html':
                ids = dom.ids if target.resolve() == (site/page).resolve() else parse(target.read_text()).ids
                if u.fragment not in ids: problems.append(f"{page}: link to {href}: no id {u.fragment!r} there")
        proc = json.loads((ROOT/'_proc'/nb).read_text())
        n_plots = sum(1 for c in proc['cells'] for o in c.get('outputs', []) if 'image/png' in o.get('data', {}))
        shown = [s for s in dom.imgs if s.startswith('data:image/png;base64,') and base64.b64decode(s.split(',', 1)[1])[:8] == b'\x89PNG\r\n\x1a\n'
                 or not s.startswith('data:') and ((site/page).parent/s).exists()]
        if len(shown) < n_plots: problems.append(f"{page}: {n_plots} plots in the notebook, {len(shown)} images that load on the page")
        if len(shown) < len(dom.imgs): problems.append(f"{page}: images that do not load: {[s[:60] for s in dom.imgs if s not in shown]}")
    assert not problems, '\n'.join(problems)
    tutorials = [p for nb,p in pages.items() if nb.startswith('tutorials/')]
    assert any(parse(doms[p]).imgs for p in tutorials), "no tutorial shows a plot"

@pytest.mark.slow
def test_screenshots_for_a_person_to_look_at(browser, site):
    "_site/screenshots/index.png and tutorial.png (the conv methods tutorial, or the first one there is)"
    shots = site/'screenshots'
    shots.mkdir(exist_ok=True)
    tut = next((p for nb,p in expected_pages().items() if nb == 'tutorials/conv_methods.ipynb'),
               next(p for nb,p in expected_pages().items() if nb.startswith('tutorials/')))
    for name,page in (('index', 'index.html'), ('tutorial', tut)):
        chromium((site/page).as_uri(), '--window-size=1400,2200', f'--screenshot={shots/name}.png')
        png = (shots/f'{name}.png').read_bytes()
        assert png[:8] == b'\x89PNG\r\n\x1a\n' and len(png) > 20_000, f"screenshot of {page} is empty"

# What a page measures at a window's width: a copy of the page with a script that writes its measurements into the DOM
PROBE = """<script>window.addEventListener('load', () => {
  const main = document.querySelector('main.content'), r = main.getBoundingClientRect(), cs = getComputedStyle(main);
  const boxes = [...main.querySelectorAll('pre, table, .output.html, .output.image, .highlight, math[display="block"]')];
  const wide = boxes.filter(e => e.scrollWidth > e.clientWidth + 2).map(e => ({tag: e.tagName.toLowerCase(), cls: e.className,
      scroll: e.scrollWidth, client: e.clientWidth, text: (e.innerText || '').trim().split('\\n')[0].slice(0, 80)}));
  const out = document.createElement('pre'); out.id = 'layout-probe';
  out.textContent = JSON.stringify({window: innerWidth, main: r.width, inner: main.clientWidth - parseFloat(cs.paddingLeft) - parseFloat(cs.paddingRight),
      page: document.documentElement.scrollWidth, boxes: boxes.length, wide: wide});
  document.body.appendChild(out);
});</script>"""

def measure(site:Path, page:str, width:int)->dict:
    "Layout figures of `page` of `site` in a `width`-px window: the content column's width, and the code blocks and tables wider than their box"
    probe = (site/page).with_name(f'_probe_{Path(page).name}')
    probe.write_text((site/page).read_text().replace('</body>', PROBE + '</body>'))
    try: dom = chromium(probe.as_uri(), f'--window-size={width},1000', '--virtual-time-budget=5000', '--dump-dom')
    finally: probe.unlink()
    m = re.search(r'<pre id="layout-probe">(.*?)</pre>', dom, re.S)
    assert m, f"{page} did not load in Chromium (no layout figures in the DOM)"
    return json.loads(html.unescape(m.group(1)))

SHOT_1280 = {'index.ipynb': 'index', 'tutorials/data_aware.ipynb': 'data_aware'}  # the README's page, and the tutorial with the widest tables

@pytest.mark.slow
def test_content_uses_the_width_at_1280px(browser, site):
    "In a 1280 px window every page's content column is ~1000 px wide and no code block or table scrolls sideways; screenshots _site/screenshots/*_1280.png"
    pages,problems = expected_pages(),[]
    with ThreadPoolExecutor(2) as ex: sizes = dict(zip(pages.values(), ex.map(lambda p: measure(site, p, 1280), pages.values())))
    for page,m in sizes.items():
        if m['main'] < 1000: problems.append(f"{page}: the content column is {m['main']:.0f} px wide in a 1280 px window (want >= 1000)")
        if m['page'] > m['window'] + 2: problems.append(f"{page}: the page is {m['page']} px wide, wider than the window ({m['window']} px)")
        problems += [f"{page}: a {w['tag']}.{w['cls']} scrolls sideways ({w['scroll']} px in {w['client']} px): {w['text']!r}" for w in m['wide']]
    m = sizes['index.html']
    print(f"\nat 1280 px: content column {m['main']:.0f} px ({m['inner']:.0f} px inside its padding); "
          f"{sum(m['boxes'] for m in sizes.values())} code blocks and tables on {len(sizes)} pages, {sum(len(m['wide']) for m in sizes.values())} too wide")
    shots = site/'screenshots'; shots.mkdir(exist_ok=True)
    for nb,name in SHOT_1280.items():
        chromium((site/pages[nb]).as_uri(), '--window-size=1280,2400', f'--screenshot={shots/name}_1280.png')
        png = (shots/f'{name}_1280.png').read_bytes()
        assert png[:8] == b'\x89PNG\r\n\x1a\n' and len(png) > 20_000, f"screenshot of {pages[nb]} is empty"
        print(f"screenshot: {shots/name}_1280.png")
    assert not problems, '\n'.join(problems)
