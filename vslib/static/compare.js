document.querySelectorAll('table.runs th').forEach(function (th, col) {
  th.addEventListener('click', function () {
    var body = th.closest('table').tBodies[0], rows = Array.from(body.rows);
    var asc = th.dataset.dir !== 'asc';
    th.closest('tr').querySelectorAll('th').forEach(function (h) { h.dataset.dir = ''; h.classList.remove('asc', 'desc'); });
    th.dataset.dir = asc ? 'asc' : 'desc'; th.classList.add(asc ? 'asc' : 'desc');
    function key(r) { var c = r.cells[col]; var v = c.dataset.v !== undefined ? c.dataset.v : c.textContent.trim();
                      var n = parseFloat(v); return (v !== '' && !isNaN(n) && isFinite(v)) ? n : v.toLowerCase(); }
    rows.sort(function (a, b) { var x = key(a), y = key(b);
      if (typeof x !== typeof y) return typeof x === 'number' ? -1 : 1;
      return (x < y ? -1 : x > y ? 1 : 0) * (asc ? 1 : -1); });
    rows.forEach(function (r) { body.appendChild(r); });
  });
});
