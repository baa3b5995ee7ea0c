// Throughput driver for collective.js 0.3.1 (see run.sh next to it): member i of n writes k keys
// w<i>.<j> from a common start time, and reports when it holds all n*k.
var Collective = require('collective');
var i = +process.argv[2], n = +process.argv[3], k = +process.argv[4], start = +process.argv[5], base = +process.argv[6];
var all = [];
for (var m = 0; m < n; m++) all.push({host: '127.0.0.1', port: base + m});
new Collective({host: '127.0.0.1', port: base + i}, all, function (c) {
    setTimeout(function () {
        for (var j = 0; j < k; j++) c.set('w' + i + '.' + j, j);
        var check = setInterval(function () {
            var total = 0;
            for (var m = 0; m < n; m++) { var w = c.get('w' + m); if (w) total += Object.keys(w).length; }
            if (total >= n * k) {
                clearInterval(check);
                console.log(JSON.stringify({member: i, seconds: (Date.now() - start) / 1000, total: total}));
                setTimeout(function () { process.exit(0); }, 3000);
            }
        }, 5);
        setTimeout(function () { console.log(JSON.stringify({member: i, seconds: null})); process.exit(1); }, 120000);
    }, Math.max(0, start - Date.now()));
});
