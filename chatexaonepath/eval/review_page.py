"""The review page: one HTML document, no external assets (it works offline and on a locked-down host).

Every text from the run (question, report, answer, criteria) is put into the page with
`textContent`, never as HTML, so an answer cannot inject markup or script into the reviewer's page.
"""

PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>ChatEXAONEPath — grade answers</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
 body{font-family:system-ui,sans-serif;margin:0;background:#f6f7f9;color:#1d2330}
 header{background:#1d2330;color:#fff;padding:.7rem 1.2rem;display:flex;justify-content:space-between}
 main{max-width:1100px;margin:1rem auto;padding:0 1rem}
 section{background:#fff;border:1px solid #d9dde5;border-radius:6px;padding:.8rem 1rem;margin-bottom:.8rem}
 h2{font-size:.85rem;text-transform:uppercase;letter-spacing:.04em;color:#5b6475;margin:.1rem 0 .5rem}
 .text{white-space:pre-wrap;line-height:1.45}
 #report{max-height:22rem;overflow:auto}
 table{border-collapse:collapse;width:100%} td{padding:.35rem .4rem;border-top:1px solid #eceef2;vertical-align:top}
 .def{color:#5b6475;font-size:.85rem} label{margin-right:.8rem;white-space:nowrap}
 button{font-size:1rem;padding:.5rem 1.4rem;border-radius:4px;border:0;background:#2f6fdb;color:#fff;cursor:pointer}
 button:disabled{background:#9fb4db;cursor:default} #error{color:#b3261e} .note{color:#5b6475;font-size:.85rem}
</style></head>
<body>
<header><strong>Grade answers against the report</strong><span id="progress"></span></header>
<main>
 <p class="note">You see the question, the pathology report and the model's answer. The automatic judge's verdict is
 not shown, so that your grade is independent of it.</p>
 <div id="done" hidden><section><h2>Done</h2><p>Every answer of this run has your grade. Thank you.</p></section></div>
 <div id="work" hidden>
  <section><h2>Question</h2><div id="question" class="text"></div></section>
  <section><h2>Report</h2><div id="report" class="text"></div></section>
  <section><h2>Model's answer</h2><div id="answer" class="text"></div></section>
  <section><h2>Criteria</h2><table id="criteria"></table></section>
  <section><h2>Overall</h2>
   <label><input type="radio" name="accepted" value="true" id="accept"> Accept</label>
   <label><input type="radio" name="accepted" value="false" id="reject"> Reject</label>
   <p><textarea id="comment" rows="2" cols="80" maxlength="4000" placeholder="Comment (optional)"></textarea></p>
   <button id="submit" disabled>Save grade and show the next answer</button> <span id="error"></span>
  </section>
 </div>
</main>
<script>
let current = null;
const $ = (id) => document.getElementById(id);
function complete() {
  if (!current) return false;
  const all = current.criteria.every(c => document.querySelector(`input[name="crit-${c.id}"]:checked`));
  return all && document.querySelector('input[name="accepted"]:checked') !== null;
}
function render(state) {
  current = state;
  $('progress').textContent = `${state.reviewer}: ${state.n_graded} of ${state.n_items} graded`;
  $('error').textContent = '';
  $('done').hidden = state.item !== null; $('work').hidden = state.item === null;
  if (!state.item) return;
  $('question').textContent = state.item.question;
  $('report').textContent = state.item.report;
  $('answer').textContent = state.item.answer;
  const table = $('criteria'); table.replaceChildren();
  for (const c of state.criteria) {
    const row = table.insertRow(), name = row.insertCell(), choice = row.insertCell();
    const title = document.createElement('strong'); title.textContent = c.name + (c.severity === 'minor' ? ' (minor)' : '');
    const def = document.createElement('div'); def.className = 'def'; def.textContent = c.definition;
    name.append(title, def);
    for (const [value, text] of [['true', 'Pass'], ['false', 'Fail']]) {
      const label = document.createElement('label'), input = document.createElement('input');
      input.type = 'radio'; input.name = `crit-${c.id}`; input.value = value; input.id = `crit-${c.id}-${value === 'true' ? 'pass' : 'fail'}`;
      input.addEventListener('change', () => { $('submit').disabled = !complete(); });
      label.append(input, ' ' + text); choice.append(label);
    }
  }
  for (const input of document.querySelectorAll('input[name="accepted"]')) input.checked = false;
  $('comment').value = ''; $('submit').disabled = true;
}
async function load() {
  const response = await fetch('api/state');
  render(await response.json());
}
for (const input of document.querySelectorAll('input[name="accepted"]'))
  input.addEventListener('change', () => { $('submit').disabled = !complete(); });
$('submit').addEventListener('click', async () => {
  if (!complete()) return;
  $('submit').disabled = true;
  const criteria = {};
  for (const c of current.criteria)
    criteria[c.id] = document.querySelector(`input[name="crit-${c.id}"]:checked`).value === 'true';
  const grade = {id: current.item.id, criteria,
                 accepted: document.querySelector('input[name="accepted"]:checked').value === 'true',
                 comment: $('comment').value};
  const response = await fetch('api/grade', {method: 'POST', headers: {'Content-Type': 'application/json'},
                                             body: JSON.stringify(grade)});
  const body = await response.json();
  if (!response.ok) { $('error').textContent = body.error || 'The grade was not saved.'; $('submit').disabled = false; return; }
  render(body);
});
load();
</script>
</body></html>
"""
