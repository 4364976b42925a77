const results = [];
const show = (text) => { document.getElementById('status').textContent = text; };
const post = (path, init) => fetch(path, {method: 'POST', ...init, headers: {[PAGE_HEADER]: 'page', ...(init.headers || {})}});
const postJson = (path, body) => post(path, {headers: {'Content-Type': 'application/json'}, body: JSON.stringify(body)});
async function message(answer) {
  try { return (await answer.json()).error || `HTTP ${answer.status}`; } catch (e) { return `HTTP ${answer.status}`; }
}
function card(r) {
  const div = document.createElement('div');
  div.className = 'card' + (r.abnormal ? ' abnormal' : '');
  div.dataset.id = r.id;
  const title = document.createElement('div'); title.className = 'name'; title.textContent = r.name; div.appendChild(title);
  if (r.field) { const where = document.createElement('div'); where.className = 'muted'; where.textContent = `cell ${r.cell} of ${r.field} at (${r.x}, ${r.y})`; div.appendChild(where); }
  for (const [src, alt] of [[r.seen, 'as the network saw it'], [r.gradcam, 'Grad-CAM']]) {
    if (!src) continue;
    const img = document.createElement('img'); img.src = src; img.alt = alt; img.className = alt.startsWith('Grad') ? 'gradcam' : 'seen';
    div.appendChild(img);
  }
  const cls = document.createElement('div'); cls.className = 'predicted';
  cls.textContent = r.predicted; div.appendChild(cls);
  if (r.abnormal) { const f = document.createElement('div'); f.className = 'flag'; f.textContent = `abnormal (p ${(100 * r.p_abnormal).toFixed(1)}%)`; div.appendChild(f); }
  const top = document.createElement('ol');
  for (const [name, p] of r.top3) { const li = document.createElement('li'); li.textContent = `${name} ${(100 * p).toFixed(1)}%`; top.appendChild(li); }
  div.appendChild(top);
  const select = document.createElement('select'); select.className = 'corrected';
  const choose = document.createElement('option'); choose.value = ''; choose.textContent = 'choose the right class'; select.appendChild(choose);
  for (const name of CLASSES) { const o = document.createElement('option'); o.value = name; o.textContent = name; select.appendChild(o); }
  select.value = '';
  const button = document.createElement('button'); button.textContent = 'Mark wrong: save as this class'; button.className = 'correct';
  button.disabled = true;
  select.onchange = () => { button.disabled = select.value === ''; };
  const saved = document.createElement('div'); saved.className = 'saved';
  button.onclick = async () => {
    if (select.value === '') return;
    const answer = await postJson('correct', {id: r.id, corrected: select.value});
    if (!answer.ok) { saved.textContent = await message(answer); return; }
    const body = await answer.json();
    saved.textContent = `saved as ${body.saved}` + (body.note ? ` (${body.note})` : '');
  };
  div.append(select, button, saved);
  return div;
}
function redraw() {
  const abnormalFirst = document.getElementById('abnormal-first').checked;
  const confidence = (r) => r.top3[0][1];
  const ordered = [...results].sort((a, b) => abnormalFirst ? (b.abnormal - a.abnormal) || (confidence(a) - confidence(b))
                                                            : confidence(a) - confidence(b));
  const box = document.getElementById('results'); box.replaceChildren(...ordered.map(card));
  const counts = {}; for (const r of results) counts[r.predicted] = (counts[r.predicted] || 0) + 1;
  const flagged = results.filter((r) => r.abnormal).length;
  document.getElementById('counts').textContent = Object.entries(counts).map(([k, v]) => `${k}: ${v}`).join(' · ')
    + (results.some((r) => r.abnormal !== null) ? ` · abnormal: ${flagged}` : '');
}
function showField(f) {
  const figure = document.createElement('figure'); figure.className = 'field';
  const img = document.createElement('img'); img.src = f.overlay; img.alt = `overlay of ${f.name}`; figure.appendChild(img);
  const caption = document.createElement('figcaption'); caption.textContent = `${f.name}: ${f.cells} cell(s) found; each is a card below`;
  figure.appendChild(caption); document.getElementById('fields').appendChild(figure);
}
function error(text) { const p = document.createElement('p'); p.className = 'error'; p.textContent = text; document.getElementById('errors').appendChild(p); }
const PER_REQUEST = 4;  // images sent together: results appear a few at a time, predicted as one batch
async function send(files) {
  for (let start = 0; start < files.length; start += PER_REQUEST) {
    const group = files.slice(start, start + PER_REQUEST);
    show(`predicting ${start + 1}–${start + group.length} of ${files.length}…`);
    const form = new FormData();
    for (const file of group) form.append('files', file, file.webkitRelativePath || file.name);
    form.append('field', document.getElementById('as-field').value);
    const answer = await post('predict', {body: form});
    if (!answer.ok) { error(`${group.map((f) => f.webkitRelativePath || f.name).join(', ')}: ${await message(answer)}`); continue; }
    const body = await answer.json();
    for (const r of body.results) {
      if (r.error) error(`${r.name}: ${r.error}`); else if (r.kind === 'field') showField(r); else results.push(r);
    }
    redraw();
  }
  show(`${results.length} image(s) predicted`);
}
async function download(path, name) {
  const answer = await postJson(path, {ids: results.map((r) => r.id)});
  if (!answer.ok) { error(`${name}: ${await message(answer)}`); return; }
  const link = document.createElement('a'); link.href = URL.createObjectURL(await answer.blob()); link.download = name;
  document.body.appendChild(link); link.click(); link.remove();
}
document.getElementById('pick-files').onchange = (e) => send([...e.target.files]);
document.getElementById('pick-folder').onchange = (e) => send([...e.target.files]);
document.getElementById('abnormal-first').onchange = redraw;
document.getElementById('download-csv').onclick = () => download('batch.csv', 'predictions.csv');
document.getElementById('download-report').onclick = () => download('report', 'report.html');
const drop = document.getElementById('drop');
drop.ondragover = (e) => { e.preventDefault(); drop.classList.add('over'); };
drop.ondragleave = () => drop.classList.remove('over');
drop.ondrop = (e) => { e.preventDefault(); drop.classList.remove('over'); send([...e.dataTransfer.files]); };
